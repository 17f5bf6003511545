"""flexep: expert-parallel MoE token exchange on any torch.distributed backend.

``import flexep as deep_ep`` gives DeepEP V1's ``Buffer`` API on NCCL, HCCL or Gloo.
"""

import warnings

with warnings.catch_warnings():
    # The CPU wheel of torch warns at import that NumPy is missing; flexep does not use NumPy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch  # noqa: F401

from . import autograd, checkpoint, eplb, moe, utils
from .buffer import Buffer, topk_idx_t
from .config import Config
from .errors import (
    BrokenCommunicatorError,
    CapacityError,
    CommTimeoutError,
    ConservationError,
    FlexepRuntimeError,
    PeerFailureError,
    RankMismatchError,
    RemoteInputError,
)
from .event import EventHandle, EventOverlap
from .low_latency import LowLatencyHandle
from .normal import NormalHandle
from .topology import Topology
from .transport import TrafficStats

__version__ = "0.1.0"

__all__ = [
    "Buffer", "Config", "EventOverlap", "EventHandle", "NormalHandle", "LowLatencyHandle", "Topology",
    "TrafficStats", "topk_idx_t", "autograd", "checkpoint", "eplb", "moe", "utils",
    "FlexepRuntimeError", "CommTimeoutError", "PeerFailureError", "RankMismatchError",
    "RemoteInputError", "CapacityError", "BrokenCommunicatorError", "ConservationError", "__version__",
]
