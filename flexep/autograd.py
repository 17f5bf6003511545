"""Dispatch and combine as differentiable functions.

Dispatch and combine are adjoint linear maps: the backward of a dispatch is a combine of the
gradients of the received rows (each source row's gradient is the sum of its copies'), and the
backward of a combine is a cached dispatch of the output gradient along the same handle.
``recv_topk_weights`` is differentiable too: its gradient travels back with the combine of the
weights, which sums exactly one non-zero contribution per (token, slot).

Both functions are collective: every rank must run forward and backward.
"""

from __future__ import annotations

import torch

from .buffer import Buffer
from .normal import NormalHandle

__all__ = ["dispatch", "combine"]


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer: Buffer, x, topk_idx, topk_weights, num_experts: int, expert_alignment: int):
        layout = buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
            is_token_in_rank=layout[3], num_tokens_per_expert=layout[2], topk_idx=topk_idx,
            topk_weights=topk_weights, expert_alignment=expert_alignment)
        ctx.buffer, ctx.handle, ctx.x_dtype = buffer, handle, x.dtype
        ctx.save_for_backward(recv_idx)
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w, counts, handle

    @staticmethod
    def backward(ctx, grad_x, _grad_idx, grad_w, _counts, _handle):
        (recv_idx,) = ctx.saved_tensors
        if grad_x is None:
            grad_x = torch.zeros(ctx.handle.num_rows, ctx.handle.hidden, dtype=ctx.x_dtype)
        if grad_w is None:
            grad_w = torch.zeros(recv_idx.shape, dtype=torch.float32)
        # Slots of experts held elsewhere are constant zeros in the output: no gradient.
        grad_w = torch.where(recv_idx >= 0, grad_w.float(), 0.0)
        gx, gw, _ = ctx.buffer.combine(grad_x.contiguous(), ctx.handle, topk_weights=grad_w.contiguous())
        return None, gx, None, gw, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer: Buffer, x, handle: NormalHandle):
        out, _, _ = buffer.combine(x, handle)
        ctx.buffer, ctx.handle = buffer, handle
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, *_ = ctx.buffer.dispatch(grad_out.contiguous(), handle=ctx.handle)
        return None, grad_x, None


def dispatch(buffer: Buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
             num_experts: int, expert_alignment: int = 1):
    """Differentiable normal dispatch of ``x: [T, H]`` (float) with ``topk_idx: [T, K] int64``.

    Returns ``(recv_x [M, H], recv_topk_idx [M, K], recv_topk_weights [M, K], counts, handle)``;
    gradients flow to ``x`` and ``topk_weights``.
    """
    return _Dispatch.apply(buffer, x, topk_idx, topk_weights, num_experts, expert_alignment)


def combine(buffer: Buffer, x: torch.Tensor, handle: NormalHandle) -> torch.Tensor:
    """Differentiable normal combine of ``x: [M, H]``; returns ``[T, H]``, gradient to ``x``."""
    return _Combine.apply(buffer, x, handle)
