"""DeepEP's public APIs as faces over :mod:`flexep.core`: V1 ``Buffer``; V2.0 ``ElasticBuffer``
and V2.5 ``EPBuffer`` with ``EPHandle``, ``BufferAllocator`` and the module-level helpers."""

from .allocator import BufferAllocator, BufferBase
from .buffer import Buffer, topk_idx_t
from .elastic import ElasticBuffer, EPBuffer
from .handle import EPHandle
from .sizing import (
    get_buffer_size_hint,
    get_logical_domain_size,
    get_num_allocation_alignment,
    get_num_rdma_alignment,
    get_num_tma_alignment,
    get_physical_domain_size,
)

__all__ = ["Buffer", "topk_idx_t", "ElasticBuffer", "EPBuffer", "EPHandle", "BufferAllocator", "BufferBase",
           "get_buffer_size_hint", "get_physical_domain_size", "get_logical_domain_size",
           "get_num_allocation_alignment", "get_num_tma_alignment", "get_num_rdma_alignment"]
