"""``deep_ep.buffers.ep`` (V2.5), from flexep."""

from flexep import EPBuffer, EPHandle  # noqa: F401
