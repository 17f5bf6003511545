"""The core API every face is built on: :class:`Communicator` with frozen requests and results.

Example (two ranks, CPU)::

    comm = Communicator(group)
    lay = comm.layout(topk_idx, num_experts)
    out = comm.dispatch(DispatchRequest(x=x, is_token_in_rank=lay.is_token_in_rank,
                                        num_tokens_per_expert=lay.num_tokens_per_expert,
                                        num_experts=num_experts, topk_idx=topk_idx,
                                        topk_weights=topk_weights))
    y = experts(out.x, out.topk_idx, out.topk_weights)          # [M, H], weighted per row
    combined = comm.combine(CombineRequest(x=y, handle=out.handle)).x   # [T, H]
"""

from ..algorithms.contract import (
    CachedDispatchRequest,
    Combined,
    CombineRequest,
    Dispatched,
    DispatchRequest,
    LLCombineRequest,
    LLDispatchRequest,
    LowLatencyHandle,
    NormalHandle,
)
from .communicator import Communicator, Options

__all__ = ["Communicator", "Options", "DispatchRequest", "CachedDispatchRequest", "CombineRequest",
           "LLDispatchRequest", "LLCombineRequest", "Dispatched", "Combined", "NormalHandle",
           "LowLatencyHandle"]
