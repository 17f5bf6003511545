"""flexep: expert-parallel MoE token exchange on any torch.distributed backend.

``import flexep as deep_ep`` gives DeepEP's V1 ``Buffer`` API on NCCL, HCCL, XCCL or Gloo;
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
from .deepep.buffer import Buffer, topk_idx_t
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
]
