"""Single-process oracle: every rank's expected outputs from every rank's inputs.

This is the readable specification of flexep's semantics and the test oracle. It is written
as plainly as possible with Python loops, and shares no code with the algorithms it checks
(it does not import :mod:`flexep.layout`, :mod:`flexep.normal` or :mod:`flexep.low_latency`).

Conventions: lists are indexed by rank; ``topk_idx[r]: [T_r, K] int64`` holds global expert
ids with ``-1`` for unused slots; rank ``r`` owns experts ``[r * L, (r + 1) * L)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["RefLayout", "RefDispatch", "ref_layout", "ref_dispatch", "ref_combine",
           "ref_ll_dispatch", "ref_ll_combine"]


@dataclass
class RefLayout:
    num_tokens_per_rank: torch.Tensor  # [W] int32
    num_tokens_per_node: Optional[torch.Tensor]  # [N] int32 or None
    num_tokens_per_expert: torch.Tensor  # [E] int32
    is_token_in_rank: torch.Tensor  # [T, W] bool


def ref_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int,
               ranks_per_node: Optional[int] = None) -> RefLayout:
    """``get_dispatch_layout`` for one rank, token by token."""
    local = num_experts // num_ranks
    num_tokens = topk_idx.size(0)
    per_rank = [0] * num_ranks
    per_expert = [0] * num_experts
    in_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool)
    num_nodes = num_ranks // ranks_per_node if ranks_per_node else 1
    per_node = [0] * num_nodes
    for t in range(num_tokens):
        ranks, nodes = set(), set()
        for e in topk_idx[t].tolist():
            if e < 0:
                continue
            per_expert[e] += 1
            ranks.add(e // local)
            if ranks_per_node:
                nodes.add(e // local // ranks_per_node)
        for r in ranks:
            per_rank[r] += 1
            in_rank[t, r] = True
        for n in nodes:
            per_node[n] += 1
    return RefLayout(
        num_tokens_per_rank=torch.tensor(per_rank, dtype=torch.int32),
        num_tokens_per_node=torch.tensor(per_node, dtype=torch.int32) if num_nodes > 1 else None,
        num_tokens_per_expert=torch.tensor(per_expert, dtype=torch.int32),
        is_token_in_rank=in_rank,
    )


@dataclass
class RefDispatch:
    """Expected normal-mode dispatch outputs of one rank."""

    recv_x: torch.Tensor  # [M, H]
    recv_src: list  # [(src_rank, src_token)] per received row
    recv_topk_idx: Optional[torch.Tensor]  # [M, K] local ids, -1 elsewhere
    recv_topk_weights: Optional[torch.Tensor]  # [M, K] float32, 0 where -1
    num_recv_tokens_per_expert: list  # [L] python ints, unaligned
    rank_prefix_matrix: torch.Tensor  # [W, W] int32, inclusive prefix over sources


def _ranks_of(row: Sequence[int], local: int) -> set:
    return {e // local for e in row if e >= 0}


def ref_dispatch(xs: Sequence[torch.Tensor], topk_idx: Sequence[torch.Tensor], num_experts: int,
                 topk_weights: Optional[Sequence[torch.Tensor]] = None) -> list[RefDispatch]:
    """Normal dispatch for all ranks: rows grouped by source rank, in source token order."""
    world = len(xs)
    local = num_experts // world
    sent = [[0] * world for _ in range(world)]
    out = []
    for dst in range(world):
        rows, src, idx_rows, w_rows = [], [], [], []
        per_expert = [0] * local
        for s in range(world):
            for t in range(xs[s].size(0)):
                ids = topk_idx[s][t].tolist()
                if dst not in _ranks_of(ids, local):
                    continue
                sent[s][dst] += 1
                rows.append(xs[s][t])
                src.append((s, t))
                loc = [e - dst * local if e >= 0 and e // local == dst else -1 for e in ids]
                for e in loc:
                    if e >= 0:
                        per_expert[e] += 1
                idx_rows.append(loc)
                if topk_weights is not None:
                    w = topk_weights[s][t].tolist()
                    w_rows.append([w[k] if loc[k] >= 0 else 0.0 for k in range(len(loc))])
        hidden_shape = xs[0].shape[1:]
        recv_x = torch.stack(rows) if rows else xs[0].new_empty((0, *hidden_shape))
        k = topk_idx[0].size(1)
        out.append(RefDispatch(
            recv_x=recv_x, recv_src=src,
            recv_topk_idx=torch.tensor(idx_rows, dtype=torch.int64).view(-1, k),
            recv_topk_weights=(torch.tensor(w_rows, dtype=torch.float32).view(-1, k)
                               if topk_weights is not None else None),
            num_recv_tokens_per_expert=per_expert, rank_prefix_matrix=None))
    prefix = torch.tensor(sent, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    for r in out:
        r.rank_prefix_matrix = prefix
    return out


def ref_combine(ys: Sequence[torch.Tensor], dispatched: Sequence[RefDispatch],
                num_tokens: Sequence[int],
                weights: Optional[Sequence[torch.Tensor]] = None) -> list[tuple]:
    """Normal combine: token t of rank s gets the float64 sum of the rows the ranks returned.

    ``ys[r]: [M_r, H]`` are the rows rank r returns (same order as its received rows).
    Returns per rank ``(combined [T, H] float64, combined_weights [T, K] float64 or None)``.
    """
    world = len(ys)
    hidden_shape = ys[0].shape[1:]
    acc = [torch.zeros((num_tokens[s], *hidden_shape), dtype=torch.float64) for s in range(world)]
    wacc = None
    if weights is not None:
        k = weights[0].size(1)
        wacc = [torch.zeros(num_tokens[s], k, dtype=torch.float64) for s in range(world)]
    for r in range(world):
        for row, (s, t) in enumerate(dispatched[r].recv_src):
            acc[s][t] += ys[r][row].double()
            if wacc is not None:
                wacc[s][t] += weights[r][row].double()
    return [(acc[s], wacc[s] if wacc is not None else None) for s in range(world)]


def ref_ll_dispatch(xs: Sequence[torch.Tensor], topk_idx: Sequence[torch.Tensor],
                    num_experts: int) -> list[dict]:
    """Low-latency dispatch for all ranks, as per-local-expert lists of ``(src_rank, src_token)``.

    Returns per rank ``{"count": [L] ints, "tokens": [[(s, t), ...] per local expert],
    "rows": [[x row, ...] per local expert]}``. Slot order inside an expert is not specified
    by DeepEP, so callers compare as multisets or sort by ``(s, t)``.
    """
    world = len(xs)
    local = num_experts // world
    out = []
    for dst in range(world):
        tokens = [[] for _ in range(local)]
        rows = [[] for _ in range(local)]
        for s in range(world):
            for t in range(xs[s].size(0)):
                for e in topk_idx[s][t].tolist():
                    if e >= 0 and e // local == dst:
                        tokens[e - dst * local].append((s, t))
                        rows[e - dst * local].append(xs[s][t])
        out.append({"count": [len(v) for v in tokens], "tokens": tokens, "rows": rows})
    return out


def ref_ll_combine(expert_out, topk_idx: Sequence[torch.Tensor],
                   topk_weights: Sequence[torch.Tensor], hidden: int) -> list[torch.Tensor]:
    """Low-latency combine: ``sum_k w[t, k] * y(expert topk_idx[t, k], token t)`` in float64.

    ``expert_out(e, s, t) -> [H] tensor`` gives expert e's output for token t of rank s.
    Returns per rank ``[T_s, H] float64``; a token whose slots are all -1 gets zeros.
    """
    out = []
    for s in range(len(topk_idx)):
        acc = torch.zeros(topk_idx[s].size(0), hidden, dtype=torch.float64)
        for t in range(topk_idx[s].size(0)):
            for k, e in enumerate(topk_idx[s][t].tolist()):
                if e >= 0:
                    acc[t] += float(topk_weights[s][t, k]) * expert_out(e, s, t).double()
        out.append(acc)
    return out
