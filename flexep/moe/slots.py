"""The received (row, slot) pairs of an MoE layer's local experts, and their sum per row.

Shape legend: :mod:`flexep.algorithms.contract` (``M`` received rows, ``K`` top-k slots, ``L``
local experts, ``S`` served pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LocalSlots", "local_slots", "served_rows", "weighted_rows", "sum_slots_per_row"]


@dataclass(frozen=True)
class LocalSlots:
    """The ``S`` (row, slot) pairs this rank serves, grouped by local expert.

    ``pos [S]`` flat index ``row * K + slot``; ``rows``/``slots [S]`` its parts; ``counts [L]``
    pairs per local expert. Within an expert, pairs keep (source rank, source token) order, the
    same at every EP size.
    """

    pos: torch.Tensor
    rows: torch.Tensor
    slots: torch.Tensor
    counts: torch.Tensor


def local_slots(recv_idx: torch.Tensor, num_local: int) -> LocalSlots:
    """``recv_idx [M, K] int64`` local expert ids (``-1``: elsewhere) -> :class:`LocalSlots`.

    Example (K = 2): ``[[1, -1], [0, 1]] -> pos [2, 0, 3]`` (expert 0: row 1 slot 0; expert 1:
    row 0 slot 0, row 1 slot 1), ``counts [1, 2]``.
    """
    k = recv_idx.size(1)
    flat = recv_idx.flatten()
    pos = (flat >= 0).nonzero().flatten()
    pos = pos[torch.sort(flat[pos], stable=True).indices]
    return LocalSlots(pos, pos // k, pos % k, torch.bincount(flat[pos], minlength=num_local))


def served_rows(recv_x: torch.Tensor, recv_w: torch.Tensor, served: LocalSlots) -> tuple:
    """The experts' inputs: ``(recv_x [M, H] -> [S, H], recv_w [M, K] -> [S])``, grouped by local
    expert as ``served`` lists them; differentiable in both.

    ``index_select`` on the row index and on the flat ``(row, slot)`` position: the same values as
    ``recv_x[rows]`` and ``recv_w[rows, slots]``, at a fraction of advanced indexing's fixed cost
    (a decode step's layer calls it on a few hundred rows).
    """
    return recv_x.index_select(0, served.rows), recv_w.reshape(-1).index_select(0, served.pos)


def weighted_rows(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out [S, H]`` (any float dtype) times ``weights [S]`` float32 -> ``[S, H]`` float32.

    Without gradients the product is written into the float32 copy of ``out`` (one fresh
    ``[S, H]`` buffer instead of two: at 512 tokens x 7168 a layer's pairs are 117 MB in float32,
    and the second buffer's first touch cost as much as the multiply); same bits either way.
    """
    y = out.float()
    w = weights.unsqueeze(1)
    if y is out or (torch.is_grad_enabled() and (y.requires_grad or w.requires_grad)):
        return y * w
    return y.mul_(w)


def sum_slots_per_row(y: torch.Tensor, served: LocalSlots, num_rows: int) -> torch.Tensor:
    """``y [S, H]`` float32 outputs of the served pairs -> ``[M, H]`` float32, each row the sum of
    its slots in slot order 0..K-1 (a row without served slots is zero).

    One ``embedding_bag(mode="sum")`` pass, each row a bag of its pairs in slot order: every
    output row is read and written once (a scatter-add per slot re-reads and re-writes an
    ``[M, H]`` float32 accumulator ``K`` times), and the bag kernel adds a bag's rows one after
    the other, so the order of the additions is fixed.
    """
    if num_rows == 0:
        return y.new_zeros(0, y.size(1))
    order = torch.argsort(served.pos)  # by row, then slot: pos = row * K + slot
    per_row = torch.bincount(served.rows, minlength=num_rows)
    offsets = torch.cumsum(per_row, 0) - per_row
    return F.embedding_bag(order, y, offsets, mode="sum")
