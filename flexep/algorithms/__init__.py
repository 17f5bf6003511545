"""Exchange algorithms behind one contract (:mod:`flexep.algorithms.contract`).

* :class:`~flexep.algorithms.flat.Flat` — one exchange each way over the EP group;
* :class:`~flexep.algorithms.hierarchical.Hierarchical` — network hop once per node, then
  forwarded inside the node;
* :class:`~flexep.algorithms.low_latency.LowLatency` — fixed capacity, static shapes, no host read.

Shared pieces: :mod:`~flexep.algorithms.packing` (row plumbing) and
:mod:`~flexep.algorithms.reduce` (combine's deterministic float32 sum). Low-latency pieces:
:mod:`~flexep.algorithms.ll_wire` (wire rows, slot layout), :mod:`~flexep.algorithms.ll_reduce`
(the owner's weighted sum), :mod:`~flexep.algorithms.logfmt` (DeepEP's 10-bit combine encoding),
:mod:`~flexep.algorithms.ll_shrink` (shrink mode).
"""

from .contract import (
    CachedDispatchRequest,
    Combined,
    CombineRequest,
    Dispatched,
    DispatchRequest,
    LLCombineRequest,
    LLDispatchRequest,
    LowLatencyAlgorithm,
    LowLatencyHandle,
    NormalAlgorithm,
    NormalHandle,
)
from .flat import Flat
from .hierarchical import Hierarchical
from .low_latency import LowLatency

__all__ = ["CachedDispatchRequest", "Combined", "CombineRequest", "Dispatched", "DispatchRequest",
           "LLCombineRequest", "LLDispatchRequest", "LowLatencyAlgorithm", "LowLatencyHandle",
           "NormalAlgorithm", "NormalHandle", "Flat", "Hierarchical", "LowLatency"]
