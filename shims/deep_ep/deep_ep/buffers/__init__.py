"""``deep_ep.buffers``: DeepEP's buffer modules and classes, from flexep."""

from flexep import Buffer, BufferAllocator, BufferBase, ElasticBuffer, EPBuffer, EPHandle  # noqa: F401

from . import allocator, base, elastic, ep, legacy  # noqa: F401,E402
