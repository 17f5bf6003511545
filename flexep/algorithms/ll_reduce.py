"""Low-latency combine, local pieces: the owner's weighted partial sums and the source's sum.

Shape legend: :mod:`flexep.algorithms.contract`; R = W * Q rows per call (Q per peer).

Arithmetic (fixed, so results are bitwise reproducible): the owner of a received row computes
``acc = 0; acc = fma(w[k], x[slot(k)], acc)`` in float32 over the row's local top-k slots in k
order and rounds once to ``x``'s dtype; the source adds the partial rows of a token in float32
in rank order and rounds once. A token that picked several experts on one rank is thus rounded
once more than in DeepEP (well inside BF16 tolerance).
"""

from __future__ import annotations

from typing import Optional

import torch

from .ll_wire import Alloc, _fresh, as_words

__all__ = ["reduce_owner", "sum_partials"]

# Rows per step of the owner reduction on the host: the float32 accumulator, the widened rows
# and the gathered rows of a step (about 1 MiB for hidden 7168) stay in cache, which is 2-3x
# faster than streaming whole [R, H] float32 tensors through memory.
_STEP_BYTES = 1 << 19


def reduce_owner(x: torch.Tensor, recv_slot: torch.Tensor, weights: torch.Tensor,
                 alloc: Alloc = _fresh, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Owner side: ``[R, H]`` partial sums ``sum_k w[i, k] * x[slot(i, k)]`` over local k.

    ``x: [L, R, H]`` expert outputs in dispatch slot layout (rows contiguous), ``recv_slot:
    [R, K]`` (flat slots, ``L*R`` = not local), ``weights: [R, K] float32`` the sources' weights
    for those rows. Only slots that a received row selects are read: unused slots of ``x`` may
    hold anything (even NaN). Rows of pairs that are not local are zeroed bitwise before use.
    """
    num_local, rows, hidden = x.shape
    words = as_words(x.reshape(num_local * rows, hidden))
    spare = num_local * rows
    valid = recv_slot < spare
    idx = recv_slot.clamp(max=spare - 1)
    w = torch.where(valid, weights, 0.0)
    # A pair that is not local reads some row ANDed with 0 (all-ones keeps a valid row): a
    # bitwise zero is 0.0 in every float dtype, and fma(0, 0, acc) leaves acc unchanged.
    keep = torch.where(valid, -1, 0).to(words.dtype)
    if out is None:
        out = alloc("ll_partial", (rows, hidden), x.dtype, x.device)
    # Elsewhere all rows at once: fewer kernel launches matter more than cache there.
    step = max(1, rows)
    if x.device.type == "cpu":
        step = max(1, min(rows, _STEP_BYTES // (4 * max(1, hidden))))
    acc = alloc("ll_acc", (step, hidden), torch.float32, x.device)
    wide = alloc("ll_wide", (step, hidden), torch.float32, x.device)
    picked = alloc("ll_picked", (step, words.size(1)), words.dtype, x.device)
    for lo in range(0, rows, step):
        n = min(step, rows - lo)
        a, p, v = acc[:n], picked[:n], wide[:n]
        a.zero_()
        for k in range(recv_slot.size(1)):
            torch.index_select(words, 0, idx[lo:lo + n, k], out=p)
            p.bitwise_and_(keep[lo:lo + n, k:k + 1])
            v.copy_(p.view(x.dtype))
            a.addcmul_(v, w[lo:lo + n, k:k + 1])
        out[lo:lo + n].copy_(a)
    return out


def sum_partials(back: torch.Tensor, index: torch.Tensor, num_tokens: int, alloc: Alloc = _fresh,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Source side: token t = the sum of the returned rows that carry t, rounded once.

    ``back: [R, H]`` rows in send order (float of any width, or already float32), ``index:
    [R]`` token of each row (T = padding, dropped). Returns ``out`` (``[T, H]``, written) or
    a float32 ``[T, H]`` sum when ``out`` is None.
    """
    hidden = back.size(1)
    acc = alloc("ll_sum", (num_tokens + 1, hidden), torch.float32, back.device)
    acc.zero_()
    if back.dtype != torch.float32:
        wide = alloc("ll_back32", tuple(back.shape), torch.float32, back.device)
        back = wide.copy_(back)
    acc.index_add_(0, index, back)
    if out is None:
        return acc[:num_tokens].clone()
    return out.copy_(acc[:num_tokens])
