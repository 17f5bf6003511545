"""Dispatch and combine as differentiable functions, on the core API.

Dispatch and combine are adjoint linear maps: the backward of a dispatch is a combine of the
gradients of the received rows (each source row's gradient is the sum of its copies'), and the
backward of a combine is a cached dispatch of the output gradient along the same handle.
``recv_topk_weights`` is differentiable too: its gradient travels back with the combine of the
weights, which sums exactly one non-zero contribution per (token, slot).

Both functions are collective: every rank must run forward and backward. They accept a
:class:`flexep.Buffer` or a :class:`flexep.core.Communicator`.
"""

from __future__ import annotations

from typing import Union

import torch

from .algorithms.contract import CachedDispatchRequest, CombineRequest, DispatchRequest, NormalHandle
from .core.communicator import Communicator
from .deepep.buffer import Buffer

__all__ = ["dispatch", "combine"]


def _comm(buffer: Union[Buffer, Communicator]) -> Communicator:
    if isinstance(buffer, Buffer):
        return buffer.comm
    if isinstance(buffer, Communicator):
        return buffer
    raise TypeError("buffer must be a flexep.Buffer or a flexep.core.Communicator, got "
                    f"{type(buffer).__name__}")


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm: Communicator, x, topk_idx, topk_weights, num_experts: int, expert_alignment: int):
        lay = comm.layout(topk_idx, num_experts)
        out = comm.dispatch(DispatchRequest(
            x=x, is_token_in_rank=lay.is_token_in_rank, num_tokens_per_expert=lay.num_tokens_per_expert,
            num_experts=num_experts, topk_idx=topk_idx.long(), topk_weights=topk_weights,
            num_tokens_per_rank=lay.num_tokens_per_rank, expert_alignment=expert_alignment))
        ctx.comm, ctx.handle, ctx.x_dtype = comm, out.handle, x.dtype
        ctx.save_for_backward(out.topk_idx)
        ctx.mark_non_differentiable(out.topk_idx)
        return out.x, out.topk_idx, out.topk_weights, out.num_recv_tokens_per_expert, out.handle

    @staticmethod
    def backward(ctx, grad_x, _grad_idx, grad_w, _counts, _handle):
        (recv_idx,) = ctx.saved_tensors
        h = ctx.handle
        if grad_x is None:
            grad_x = torch.zeros(h.num_rows, h.hidden, dtype=ctx.x_dtype, device=recv_idx.device)
        if grad_w is None:
            grad_w = torch.zeros(recv_idx.shape, dtype=torch.float32, device=recv_idx.device)
        # Slots of experts held elsewhere are constant zeros in the output: no gradient.
        grad_w = torch.where(recv_idx >= 0, grad_w.float(), 0.0)
        out = ctx.comm.combine(CombineRequest(x=grad_x.contiguous(), handle=h,
                                              topk_weights=grad_w.contiguous()))
        return None, out.x, None, out.topk_weights, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm: Communicator, x, handle: NormalHandle):
        ctx.comm, ctx.handle = comm, handle
        return comm.combine(CombineRequest(x=x, handle=handle)).x

    @staticmethod
    def backward(ctx, grad_out):
        out = ctx.comm.cached_dispatch(CachedDispatchRequest(x=grad_out.contiguous(), handle=ctx.handle))
        return None, out.x, None


def dispatch(buffer: Union[Buffer, Communicator], x: torch.Tensor, topk_idx: torch.Tensor,
             topk_weights: torch.Tensor, num_experts: int, expert_alignment: int = 1):
    """Differentiable normal dispatch of ``x: [T, H]`` (float) with ``topk_idx: [T, K] int64``.

    Returns ``(recv_x [M, H], recv_topk_idx [M, K], recv_topk_weights [M, K], counts, handle)``;
    gradients flow to ``x`` and ``topk_weights``.
    """
    return _Dispatch.apply(_comm(buffer), x, topk_idx, topk_weights, num_experts, expert_alignment)


def combine(buffer: Union[Buffer, Communicator], x: torch.Tensor, handle: NormalHandle) -> torch.Tensor:
    """Differentiable normal combine of ``x: [M, H]``; returns ``[T, H]``, gradient to ``x``."""
    return _Combine.apply(_comm(buffer), x, handle)
