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
import torch.nn.functional as F

from .ll_wire import Alloc, _fresh, as_words, eager_host

__all__ = ["reduce_owner", "reduce_owner_dense", "sum_partials"]

# Rows per step of the owner reduction on the host: the float32 accumulator, the widened rows
# and the gathered rows of a step (about 1 MiB for hidden 7168) stay in cache, which is 2-3x
# faster than streaming whole [R, H] float32 tensors through memory.
_STEP_BYTES = 1 << 19
# Pairs per step of the host bag path (16 rows of top-8: about 3 MiB of float32 rows at 7168).
_BAG_PAIRS = 128


def reduce_owner(x: torch.Tensor, recv_slot: torch.Tensor, weights: torch.Tensor,
                 alloc: Alloc = _fresh, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Owner side: ``[R, H]`` partial sums ``sum_k w[i, k] * x[slot(i, k)]`` over local k.

    ``x: [L, R, H]`` expert outputs in dispatch slot layout (rows contiguous), ``recv_slot:
    [R, K]`` (flat slots, ``L*R`` = not local), ``weights: [R, K] float32`` the sources' weights
    for those rows. Only slots that a received row selects are read: unused slots of ``x`` may
    hold anything (even NaN).

    On the host the work follows the pairs that are local (:func:`_reduce_bags`); elsewhere,
    and where shapes must stay static (:func:`~flexep.algorithms.ll_wire.eager_host`), every
    (row, k) pair is processed with static shapes (:func:`reduce_owner_dense`). Both give the
    same bits.
    """
    if out is None:
        out = alloc("ll_partial", (x.size(1), x.size(2)), x.dtype, x.device)
    if eager_host(x) and x.dtype != torch.float64:
        return _reduce_bags(x, recv_slot, weights, alloc, out)
    return reduce_owner_dense(x, recv_slot, weights, alloc, out)


def reduce_owner_dense(x: torch.Tensor, recv_slot: torch.Tensor, weights: torch.Tensor, alloc: Alloc,
                       out: torch.Tensor) -> torch.Tensor:
    """:func:`reduce_owner` over all ``R x K`` pairs: a pair that is not local reads some row
    ANDed with 0 (a bitwise zero is 0.0 in every float dtype) and ``fma(0, 0, acc) = acc``."""
    num_local, rows, hidden = x.shape
    words = as_words(x.reshape(num_local * rows, hidden))
    spare = num_local * rows
    valid = recv_slot < spare
    idx = recv_slot.clamp(max=spare - 1)
    w = torch.where(valid, weights, 0.0)
    keep = torch.where(valid, -1, 0).to(words.dtype)
    # On the host the rows of a step stay in cache; elsewhere all rows at once (fewer launches).
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


def _reduce_bags(x: torch.Tensor, recv_slot: torch.Tensor, weights: torch.Tensor, alloc: Alloc,
                 out: torch.Tensor) -> torch.Tensor:
    """Host path of :func:`reduce_owner`: only the local (row, k) pairs are touched.

    The local pairs, in (row, k) order, are listed once (on the host a data-dependent size
    costs nothing). Per step of whole rows holding about :data:`_BAG_PAIRS` pairs, their rows of
    ``x`` are gathered and widened to float32, then one ``embedding_bag`` with
    ``per_sample_weights`` sums each row's pairs -- the float32 ``acc = fma(w, x, acc)`` chain in
    k order, as the dense path (a row with no local pair is an empty bag: 0). Rows of ``x`` that
    no pair selects are never read.
    """
    num_local, rows, hidden = x.shape
    table = x.reshape(num_local * rows, hidden)
    valid = recv_slot < num_local * rows
    slots, w = recv_slot[valid], weights[valid]  # [P] in (row, k) order
    ends = valid.sum(1).cumsum(0)  # [R] pairs up to and including each row
    # Rows of a step: the first row whose pairs end past the next multiple of _BAG_PAIRS closes it.
    cuts = torch.searchsorted(ends, torch.arange(_BAG_PAIRS, int(ends[-1]) + _BAG_PAIRS, _BAG_PAIRS),
                              right=False) if rows else ends
    bounds = sorted({0, rows, *(min(rows, int(c) + 1) for c in cuts)})
    offsets = torch.zeros(rows + 1, dtype=torch.int64, device=x.device)
    offsets[1:] = ends
    most = max(int(offsets[hi] - offsets[lo]) for lo, hi in zip(bounds, bounds[1:])) if rows else 0
    picked = alloc("ll_picked", (max(1, most), hidden), x.dtype, x.device)
    wide = alloc("ll_wide", (max(1, most), hidden), torch.float32, x.device)
    positions = torch.arange(max(1, most), device=x.device)
    for lo, hi in zip(bounds, bounds[1:]):
        p0, p1 = int(offsets[lo]), int(offsets[hi])
        n = p1 - p0
        if n:
            torch.index_select(table, 0, slots[p0:p1], out=picked[:n])
            wide[:n].copy_(picked[:n])
        part = F.embedding_bag(positions[:n], wide[:max(1, n)], offsets[lo:hi + 1] - p0, mode="sum",
                               per_sample_weights=w[p0:p1], include_last_offset=True)
        out[lo:hi].copy_(part)
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
