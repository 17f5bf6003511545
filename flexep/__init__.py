"""flexep: expert-parallel MoE token exchange on any torch.distributed backend.

``import flexep as deep_ep`` gives DeepEP's APIs on NCCL, HCCL, XCCL or Gloo: V1's ``Buffer``,
V2.0's ``ElasticBuffer`` and V2.5's ``EPBuffer`` (``docs/deepep-v2.md``; the ``deep_ep`` shim in
``shims/deep_ep`` makes a caller's unmodified ``import deep_ep`` resolve here);
:mod:`flexep.core` is the clean core API underneath (frozen requests and results).

Layers (top to bottom): faces (:mod:`flexep.deepep`, :mod:`flexep.autograd`, :mod:`flexep.moe`)
-> core (:mod:`flexep.core`) -> algorithms (:mod:`flexep.algorithms`) -> communication
(:mod:`flexep.comm`) -> devices (:mod:`flexep.device`). ``docs/design.md`` walks through them.
"""

import warnings

with warnings.catch_warnings():
    # The CPU wheel of torch warns at import that NumPy is missing; flexep does not use NumPy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch  # noqa: F401

from . import autograd, checkpoint, elastic, eplb, moe, utils
from .algorithms.contract import LowLatencyHandle, NormalHandle
from .comm.accounting import TrafficStats
from .comm.topology import Topology
from .config import Config
from .core import Communicator, Options
from .deepep import (
    Buffer,
    BufferAllocator,
    BufferBase,
    ElasticBuffer,
    EPBuffer,
    EPHandle,
    get_buffer_size_hint,
    get_logical_domain_size,
    get_num_allocation_alignment,
    get_num_rdma_alignment,
    get_num_tma_alignment,
    get_physical_domain_size,
    topk_idx_t,
)
from .deepep.comm_api import destroy_all_managed_nccl_comm
from .errors import (
    BrokenCommunicatorError,
    CapacityError,
    CommTimeoutError,
    ConservationError,
    FlexepRuntimeError,
    PeerFailureError,
    RankMismatchError,
    RemoteInputError,
    StaleGenerationError,
)
from .event import EventHandle, EventOverlap

__version__ = "0.2.0"

__all__ = [
    "Buffer", "Config", "EventOverlap", "EventHandle", "NormalHandle", "LowLatencyHandle", "Topology",
    "TrafficStats", "topk_idx_t", "Communicator", "Options", "autograd", "checkpoint", "elastic", "eplb",
    "moe", "utils", "FlexepRuntimeError", "CommTimeoutError", "PeerFailureError", "RankMismatchError",
    "RemoteInputError", "CapacityError", "BrokenCommunicatorError", "ConservationError",
    "StaleGenerationError", "__version__",
    "ElasticBuffer", "EPBuffer", "EPHandle", "BufferAllocator", "BufferBase", "get_buffer_size_hint",
    "get_physical_domain_size", "get_logical_domain_size", "get_num_allocation_alignment",
    "get_num_tma_alignment", "get_num_rdma_alignment", "destroy_all_managed_nccl_comm",
]
