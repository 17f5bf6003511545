"""``deep_ep.buffers.allocator`` (V2.5), from flexep."""

from flexep import BufferAllocator  # noqa: F401
