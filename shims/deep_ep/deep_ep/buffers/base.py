"""``deep_ep.buffers.base`` (V2.5), from flexep."""

from flexep import BufferBase  # noqa: F401
