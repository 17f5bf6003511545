"""``deep_ep.utils.event``: DeepEP's event types (:mod:`flexep.event`)."""

from ..event import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap"]
