"""DeepEP V2's combine reduction at the source, in top-k slot order (:class:`SlotOrder`).

The rows a source gets back are indexed by a ``rowmap [T, W]``: the row rank d returned for
token t (a spare zero row where d returned none). From it and the token's experts
``e_k = topk_idx[t, k]`` this module forms DeepEP V2's result bit for bit:

1. slot k *counts* the row of rank ``d_k = e_k // L`` when k is the last slot on ``d_k``
   (DeepEP stores a group's partial sum at its rightmost slot);
2. with a node level (``ranks_per_node = P``), the rank partials of node ``d_k // P`` are summed
   in float32 in that slot order and rounded once, counted at the node's last slot;
3. ``acc = sum(bias)`` in float32, then ``acc += value`` at each counting slot, in slot order;
   the result is rounded once to the rows' dtype.

Per-slot rows (``per_slot``: ``[K * H']`` wide, DeepEP without multiple reduction) count every
used slot with the value the owner put in that slot's block.

Worked example (W = 2, L = 1, no bias): ``topk_idx[t] = [1, 0, 1]``; rank 1's row counts at
slot 2, rank 0's at slot 1, so ``out = bf16((0 + row_0) + row_1)`` (rank 0 first: its last slot
comes first). Everything is static-shaped tensor math on the rows' device (no host read).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .contract import SlotOrder
from .low_latency import as_words

__all__ = ["owners", "last_in_group", "slot_rows", "slot_reduce", "ordered", "gather_rows", "pick_weights",
           "flat_rowmap"]


def owners(topk_idx: torch.Tensor, num_local: int) -> torch.Tensor:
    """``[T, K] int64`` rank owning each slot's expert, ``-1`` for unused slots.

    Example (L = 2): ``[[0, 5, -1]] -> [[0, 2, -1]]``.
    """
    return torch.where(topk_idx >= 0, torch.div(topk_idx.clamp(min=0), num_local, rounding_mode="floor"), -1)


def last_in_group(group: torch.Tensor) -> torch.Tensor:
    """``[T, K] bool``: slot k is used (``group >= 0``) and no later slot has its group.

    Example: ``[[1, 0, 1, -1]] -> [[False, True, True, False]]``.
    """
    k = group.size(1)
    same = group.unsqueeze(2) == group.unsqueeze(1)  # [T, K, K]: same[t, k, j]
    later = torch.ones(k, k, dtype=torch.bool, device=group.device).triu(1)  # j > k
    return (group >= 0) & ~(same & later).any(2)


def slot_rows(rowmap: torch.Tensor, owner: torch.Tensor, spare: int) -> torch.Tensor:
    """``[T, K] int64``: row holding slot k's owner's return, ``spare`` for unused slots."""
    rows = rowmap.gather(1, owner.clamp(min=0))
    return torch.where(owner >= 0, rows, spare)


def slot_reduce(back: torch.Tensor, rows: torch.Tensor, owner: torch.Tensor, order: SlotOrder,
                num_ranks: int, bias: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """``[T, H']`` in ``back``'s dtype: DeepEP V2's sum of the returned rows (module docstring).

    Args:
        back: ``[B + 1, D]`` returned rows, the last one zero (``D = H'``, or ``K * H'``
            with ``order.per_slot``).
        rows: ``[T, K]`` from :func:`slot_rows`.
        owner: ``[T, K]`` from :func:`owners`.
        order: the recipe.
        num_ranks: W (the node level keeps one accumulator per node).
        bias: up to two ``[T, H']`` tensors, added first.

    Each counting value is added in slot order; a token with fewer of them adds the spare zero
    row instead, as DeepEP's reference adds the zeros its grouping leaves (``+ 0.0`` changes no
    sum that did not start at ``-0.0``).
    """
    tokens, k = rows.shape
    spare = back.size(0) - 1
    if order.per_slot:
        hidden = back.size(1) // k
        flat = back.view(-1, hidden)  # row r, slot j -> r * K + j
        acc = _bias_sum(bias, tokens, hidden, back.device)
        for j in range(k):
            acc.add_(gather_rows(flat, rows[:, j] * k + j))
        return acc.to(back.dtype)
    counting = last_in_group(owner)
    if order.ranks_per_node:
        nodes = num_ranks // order.ranks_per_node
        return _node_level(back, rows, owner, counting, order.ranks_per_node, nodes, bias)
    acc = _bias_sum(bias, tokens, back.size(1), back.device)
    for col in ordered(rows, counting, spare, min(k, num_ranks)).unbind(1):
        acc.add_(gather_rows(back, col))
    return acc.to(back.dtype)


def gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` for ``t: [R, D]``, rows moved as wide integer words (faster on the host)."""
    return as_words(t).index_select(0, index).view(t.dtype)


def ordered(ids: torch.Tensor, counting: torch.Tensor, spare: int, width: int) -> torch.Tensor:
    """``[T, width]``: the ids of the counting slots, in slot order, then ``spare``.

    Example (spare 9): ids ``[[4, 5, 6]]``, counting ``[[False, True, True]]``, width 2 ->
    ``[[5, 6]]``.
    """
    k = ids.size(1)
    slot = torch.arange(k, device=ids.device).expand_as(ids)
    first = torch.argsort(torch.where(counting, slot, slot + k), dim=1)[:, :width]
    return torch.where(counting.gather(1, first), ids.gather(1, first), spare)


def _node_level(back: torch.Tensor, rows: torch.Tensor, owner: torch.Tensor, rank_last: torch.Tensor,
                ranks_per_node: int, num_nodes: int, bias: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rank partials summed per node in slot order (float32), rounded once, then the nodes
    summed in the order of their last slots."""
    tokens, k = rows.shape
    hidden, spare = back.size(1), back.size(0) - 1
    node = torch.where(owner >= 0, torch.div(owner.clamp(min=0), ranks_per_node, rounding_mode="floor"), -1)
    width = min(k, num_nodes * ranks_per_node)
    rank_rows = ordered(rows, rank_last, spare, width)
    rank_node = ordered(node, rank_last, num_nodes, width)  # num_nodes: a spare accumulator
    running = torch.zeros(tokens, num_nodes + 1, hidden, dtype=torch.float32, device=back.device)
    at = torch.arange(tokens, device=back.device)
    for g in range(width):
        running[at, rank_node[:, g]] += gather_rows(back, rank_rows[:, g]).float()
    values = running.to(back.dtype)
    values[:, num_nodes] = 0
    acc = _bias_sum(bias, tokens, hidden, back.device)
    for col in ordered(node, last_in_group(node), num_nodes, min(k, num_nodes)).unbind(1):
        acc.add_(values[at, col])
    return acc.to(back.dtype)


def _bias_sum(bias: Sequence[torch.Tensor], tokens: int, hidden: int, device: torch.device) -> torch.Tensor:
    """``float(bias0) + float(bias1)`` (DeepEP's start value), zeros without bias."""
    if not bias:
        return torch.zeros(tokens, hidden, dtype=torch.float32, device=device)
    acc = bias[0].to(torch.float32, copy=True)  # accumulated in place: never the caller's tensor
    for b in bias[1:]:
        acc = acc + b.float()
    return acc


def pick_weights(back_w: torch.Tensor, rows: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """``[T, K] float32``: slot k of the weights row the owner of ``e_k`` returned (0 if unused).

    ``back_w: [B + 1, K]`` returned weight rows, the last one zero.
    """
    k = rows.size(1)
    flat = back_w.reshape(-1).index_select(0, (rows * k + torch.arange(k, device=rows.device)).reshape(-1))
    return torch.where(owner >= 0, flat.view_as(rows), 0.0)


def flat_rowmap(is_token_in_rank: torch.Tensor, send_counts: Sequence[int], spare: int,
                position: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[T, W] int64`` rows of a flat return: block d (``send_counts[d]`` rows, tokens
    ascending) holds token t at ``offset_d + position of t among d's tokens``; ``spare`` where
    t was not sent to d. Example: ``[[1, 0], [1, 1]]``, counts ``[2, 1]`` -> ``[[0, 3], [1, 2]]``.
    """
    device = is_token_in_rank.device
    if position is None:
        position = torch.cumsum(is_token_in_rank.to(torch.int64), 0) - 1
    offsets = torch.tensor([0, *list(send_counts)[:-1]], dtype=torch.int64, device=device).cumsum(0)
    return torch.where(is_token_in_rank, offsets + position.to(torch.int64), spare)
