"""The expanded (per-expert) layout, made locally from a deduplicated receive, and its adjoint.

DeepEP V2's ``do_expand=True`` gives one row per (received token, local expert it chose),
grouped by local expert, each expert's block padded to a multiple of ``expert_alignment``.
The same rows arrive in the deduplicated (non-expanded) receive, one per token, so flexep
dispatches deduplicated and expands here: no extra bytes on the wire. Combine runs the adjoint
(:func:`fold_rows`): the expanded rows of a token are folded back into one row per received
token (their float32 sum in slot order, rounded once: DeepEP's per-rank partial) or, without
multiple reduction, into one ``[K * H]`` row holding each slot's value.

Static shapes throughout: the output row count is a host integer given by the caller (exact
with CPU sync, the worst case without), positions are computed on the device, padding rows and
rows past the last expert are zero. No host read.

Worked example (L = 2, A = 2): received local ids ``[[1, -1], [0, 1], [-1, 0]]`` give expert 0
rows ``{1, 2}`` -> expanded rows 0, 1; expert 1 rows ``{0, 1}`` -> expanded rows 2, 3 (both
blocks already aligned); ``slot_rows = [[2, -1], [0, 3], [-1, 1]]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .low_latency import as_words

__all__ = ["ExpandPlan", "worst_case_rows", "plan_expand", "expand_rows", "expand_weights", "fold_rows",
           "fold_weights"]


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def worst_case_rows(num_rows: int, num_topk: int, num_local: int, alignment: int) -> int:
    """DeepEP's expanded worst case: ``align(M * min(K, L) + (A - 1) * L, A)``.

    Example (M = 8, K = 6, L = 4, A = 4): ``align(32 + 12, 4) = 44``.
    """
    return _align(num_rows * min(num_topk, num_local) + (alignment - 1) * num_local, alignment)


@dataclass(frozen=True)
class ExpandPlan:
    """Where each (received row, slot) goes in the expanded layout.

    Attributes:
        slot_rows: ``[M, K] int64`` expanded row of (row i, slot k), ``-1`` where not local
            (DeepEP's ``recv_src_metadata[:, 2:]``).
        src_of: ``[X] int64`` received row feeding each expanded row, ``M`` for padding.
        counts: ``[L] int64`` (row, slot) pairs per local expert (unaligned).
        ends: ``[L] int64`` end of each expert's valid rows (start + count).
        num_rows: X, the expanded row count.
    """

    slot_rows: torch.Tensor
    src_of: torch.Tensor
    counts: torch.Tensor
    ends: torch.Tensor
    num_rows: int


def plan_expand(local_idx: torch.Tensor, num_local: int, alignment: int, num_rows: int) -> ExpandPlan:
    """The expanded layout of received rows with local ids ``local_idx: [M, K] int64`` (``-1`` =
    expert elsewhere, and in every padding row). ``num_rows`` (X) must hold every valid pair
    (:func:`worst_case_rows` always does). Inside an expert, rows keep the received order."""
    m, k = local_idx.shape
    device = local_idx.device
    flat = local_idx.reshape(-1)
    valid = flat >= 0
    expert = torch.where(valid, flat, num_local)
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=device)
    counts.index_add_(0, expert, torch.ones_like(expert))
    counts = counts[:num_local]
    aligned = (counts + alignment - 1) // alignment * alignment
    starts = torch.cumsum(aligned, 0) - aligned
    first = torch.cumsum(counts, 0) - counts  # sorted position where each expert's pairs begin
    row = torch.div(torch.arange(m * k, device=device), k, rounding_mode="floor")
    order = torch.argsort(expert * max(m, 1) + row, stable=True)  # by expert, received order inside
    position = torch.empty_like(order)
    position.scatter_(0, order, torch.arange(m * k, device=device))
    e = expert.clamp(max=num_local - 1)
    exp_row = torch.where(valid, starts[e] + position - first[e], -1)
    src_of = torch.full((num_rows + 1,), m, dtype=torch.int64, device=device)
    src_of.scatter_(0, torch.where(valid, exp_row, num_rows), row)
    return ExpandPlan(slot_rows=exp_row.view(m, k), src_of=src_of[:num_rows], counts=counts,
                      ends=starts + counts, num_rows=num_rows)


def expand_rows(t: torch.Tensor, plan: ExpandPlan) -> torch.Tensor:
    """``t: [M, ...]`` received rows -> ``[X, ...]`` expanded rows, zero in padding (one gather)."""
    m = t.size(0)
    if m == 0:
        return t.new_zeros((plan.num_rows, *t.shape[1:]))
    words = as_words(t.reshape(m, -1)).index_select(0, plan.src_of.clamp(max=m - 1))
    words.masked_fill_((plan.src_of >= m).unsqueeze(1), 0)  # a zero word is zero in every dtype
    return words.view(t.dtype).view(plan.num_rows, *t.shape[1:])


def expand_weights(weights: torch.Tensor, plan: ExpandPlan) -> torch.Tensor:
    """``weights: [M, K] float32`` -> ``[X] float32``: the weight of each expanded row's slot."""
    out = torch.zeros(plan.num_rows + 1, dtype=weights.dtype, device=weights.device)
    rows = plan.slot_rows.reshape(-1)
    out.scatter_(0, torch.where(rows >= 0, rows, plan.num_rows), weights.reshape(-1))
    return out[:plan.num_rows]


def fold_rows(x: torch.Tensor, plan: ExpandPlan, per_slot: bool) -> torch.Tensor:
    """Adjoint of :func:`expand_rows` for combine.

    ``x: [X', H]`` expanded rows (``X' >= X``; padding rows are never read). Returns ``[M, H]``:
    each received row's local values summed in float32 in slot order, rounded once to ``x``'s
    dtype; or with ``per_slot`` ``[M, K * H]``: slot k's value in block k (zero where the slot is
    not local).
    """
    rows = plan.slot_rows
    m, k = rows.shape
    hidden = x.size(1)
    valid = rows >= 0
    if x.size(0) == 0:  # nothing was received: every slot is elsewhere
        return x.new_zeros(m, k * hidden if per_slot else hidden)
    idx, words = rows.clamp(min=0), as_words(x)

    def slot(j: int) -> torch.Tensor:  # slot j's row of every received token, zero where not local
        picked = words.index_select(0, idx[:, j])
        return picked.masked_fill_(~valid[:, j:j + 1], 0).view(x.dtype)

    if per_slot:
        return torch.cat([slot(j) for j in range(k)], 1) if k else x.new_zeros(m, 0)
    # Rows go through in chunks whose float32 sums stay in cache on the host (2-3x faster there);
    # + 0.0 for slots that are not local leaves every sum unchanged (sums start at +0).
    step = max(1, min(m, (1 << 21) // (4 * max(1, hidden)))) if x.device.type == "cpu" else max(1, m)
    out = torch.empty(m, hidden, dtype=x.dtype, device=x.device)
    acc = torch.empty(step, hidden, dtype=torch.float32, device=x.device)
    picked = words.new_empty(step, words.size(1))
    for lo in range(0, m, step):
        n = min(step, m - lo)
        acc[:n].zero_()
        for j in range(k):
            torch.index_select(words, 0, idx[lo:lo + n, j], out=picked[:n])
            acc[:n].add_(picked[:n].masked_fill_(~valid[lo:lo + n, j:j + 1], 0).view(x.dtype))
        out[lo:lo + n].copy_(acc[:n])
    return out


def fold_weights(weights: torch.Tensor, plan: ExpandPlan) -> torch.Tensor:
    """``weights: [X'] float32`` per expanded row -> ``[M, K]`` (0 where the slot is not local)."""
    rows = plan.slot_rows
    if weights.numel() == 0:
        return torch.zeros(rows.shape, dtype=weights.dtype, device=weights.device)
    picked = weights.index_select(0, rows.clamp(min=0).reshape(-1)).view_as(rows)
    return torch.where(rows >= 0, picked, 0.0)
