"""Events for stream-ordered overlap, device-neutral.

DeepEP records CUDA events on its communication stream. flexep resolves the device module
(``torch.cuda``, ``torch.npu``, ...) from the tensor's device; on CPU every call has completed
when it returns, so the event is an already-completed marker and waiting on it is free.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

__all__ = ["EventHandle", "EventOverlap"]


def _device_module(device: Optional[torch.device]) -> Any:
    """``torch.cuda``/``torch.npu``/... for an accelerator device, ``None`` for CPU."""
    if device is None or device.type == "cpu":
        return None
    return getattr(torch, device.type, None)


class EventHandle:
    """An event recorded on the current stream of ``device`` at construction (no-op on CPU)."""

    def __init__(self, device: Optional[torch.device] = None) -> None:
        mod = _device_module(device)
        self._event = None
        if mod is not None and hasattr(mod, "Event"):
            self._event = mod.Event()
            self._event.record(mod.current_stream())
        self._mod = mod

    def current_stream_wait(self) -> None:
        """Make the current stream wait for this event (returns at once on CPU)."""
        if self._event is not None:
            self._mod.current_stream().wait_event(self._event)


class EventOverlap:
    """DeepEP's ``EventOverlap``: an optional event plus tensors kept alive until it is waited.

    ``with event: ...`` runs the body, then makes the current stream wait on the event (if any).
    """

    def __init__(self, event: Optional[EventHandle] = None,
                 extra_tensors: Optional[Tuple[torch.Tensor, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Wait on the event. Raises ``ValueError`` if this overlap holds no event."""
        if self.event is None:
            raise ValueError("this EventOverlap holds no event (the call ran with async_finish=False)")
        self.event.current_stream_wait()
        self.extra_tensors = None

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if self.event is not None:
            self.event.current_stream_wait()
