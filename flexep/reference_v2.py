"""Single-process oracle for DeepEP V2's dispatch and combine (``ElasticBuffer`` / ``EPBuffer``).

The readable specification of :mod:`flexep.deepep.elastic` and the test oracle, written with
plain Python loops and sharing no code with the algorithms (:mod:`flexep.algorithms.expand`,
:mod:`flexep.algorithms.slot_reduce`, ...). Lists are indexed by rank; ``topk_idx[r]: [T_r, K]``
holds global expert ids (``-1`` unused); rank ``r`` owns experts ``[r * L, (r + 1) * L)``;
``T`` (``num_max_tokens_per_rank``) numbers tokens globally: ``src_global = rank * T + token``.

Semantics (DeepEP V2, ``deep_ep/utils/refs.py`` and ``tests/elastic/test_ep.py``):

* **non-expanded dispatch**: one row per (source token, destination rank) when at least one of
  the token's experts lives there, ordered by ``src_global`` (DeepEP's ``deterministic=True``
  order); ``recv_topk_idx`` holds local ids (``-1`` elsewhere); flexep zeroes the weights of
  slots that are not local (DeepEP copies the sender's row; its tests mask those slots).
* **expanded dispatch**: one row per (received token, local expert it chose), grouped by local
  expert in ``src_global`` order, each expert's block padded with zero rows to a multiple of
  ``expert_alignment``.
* **combine**: an unweighted sum in DeepEP's recipe (:func:`ref_v2_combine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["RefV2Dispatch", "ref_v2_dispatch", "ref_v2_combine", "pre_combine_data", "align"]


def align(n: int, a: int) -> int:
    """``n`` rounded up to a multiple of ``a``. Example: ``align(5, 4) == 8``."""
    return (n + a - 1) // a * a


@dataclass
class RefV2Dispatch:
    """Expected V2 dispatch outputs of one rank (``M`` received tokens, ``L`` local experts)."""

    src_global: list  # [M] python ints, ascending
    recv_x: torch.Tensor  # [M, H]
    recv_scales: Optional[torch.Tensor]  # [M, S] or None
    recv_topk_idx: torch.Tensor  # [M, K] int64 local ids, -1 elsewhere
    recv_topk_weights: Optional[torch.Tensor]  # [M, K] float32, 0 where not local
    recv_per_source: list  # [W] tokens received from each source rank
    expert_counts: list  # [L] (token, slot) pairs per local expert, unaligned
    expanded_x: torch.Tensor  # [sum(align(c_j, A)), H], zero padding rows
    expanded_scales: Optional[torch.Tensor]
    expanded_weights: Optional[torch.Tensor]  # [rows] float32, 0 in padding
    slot_rows: torch.Tensor  # [M, K] int64 expanded row of (token, slot), -1 where not local
    expert_ends: list  # [L] end row of each expert's valid rows (DeepEP's expanded psum)


def ref_v2_dispatch(xs: Sequence[torch.Tensor], topk_idx: Sequence[torch.Tensor], num_experts: int,
                    num_max_tokens_per_rank: int, expert_alignment: int = 1,
                    topk_weights: Optional[Sequence[torch.Tensor]] = None,
                    scales: Optional[Sequence[torch.Tensor]] = None) -> list[RefV2Dispatch]:
    """V2 dispatch for every rank, token by token."""
    world = len(xs)
    local = num_experts // world
    out = []
    for dst in range(world):
        rows, srcs, ids_rows, w_rows, s_rows, per_source = [], [], [], [], [], [0] * world
        for s in range(world):
            for t in range(xs[s].size(0)):
                ids = topk_idx[s][t].tolist()
                loc = [e - dst * local if e >= 0 and e // local == dst else -1 for e in ids]
                if all(v < 0 for v in loc):
                    continue
                per_source[s] += 1
                rows.append(xs[s][t])
                srcs.append(s * num_max_tokens_per_rank + t)
                ids_rows.append(loc)
                if topk_weights is not None:
                    w = topk_weights[s][t].tolist()
                    w_rows.append([w[k] if loc[k] >= 0 else 0.0 for k in range(len(loc))])
                if scales is not None:
                    s_rows.append(scales[s][t])
        k = topk_idx[0].size(1)
        recv_x = torch.stack(rows) if rows else xs[0].new_empty((0, *xs[0].shape[1:]))
        recv_scales = None
        if scales is not None:
            recv_scales = torch.stack(s_rows) if s_rows else scales[0].new_empty((0, scales[0].size(1)))
        recv_idx = torch.tensor(ids_rows, dtype=torch.int64).view(-1, k)
        recv_w = torch.tensor(w_rows, dtype=torch.float32).view(-1, k) if topk_weights is not None else None
        ref = RefV2Dispatch(src_global=srcs, recv_x=recv_x, recv_scales=recv_scales, recv_topk_idx=recv_idx,
                            recv_topk_weights=recv_w, recv_per_source=per_source, expert_counts=[],
                            expanded_x=recv_x, expanded_scales=None, expanded_weights=None,
                            slot_rows=torch.full((len(rows), k), -1, dtype=torch.int64), expert_ends=[])
        _expand(ref, local, expert_alignment)
        out.append(ref)
    return out


def _expand(ref: RefV2Dispatch, local: int, alignment: int) -> None:
    """Fill the expanded layout of ``ref``: expert by expert, rows in received order."""
    m, k = ref.recv_topk_idx.shape
    x_rows, s_rows, w_rows, counts, ends = [], [], [], [], []
    for j in range(local):
        count = 0
        for i in range(m):
            for slot in range(k):
                if int(ref.recv_topk_idx[i, slot]) == j:
                    ref.slot_rows[i, slot] = len(x_rows)
                    x_rows.append(ref.recv_x[i])
                    if ref.recv_scales is not None:
                        s_rows.append(ref.recv_scales[i])
                    if ref.recv_topk_weights is not None:
                        w_rows.append(float(ref.recv_topk_weights[i, slot]))
                    count += 1
        counts.append(count)
        ends.append(len(x_rows))
        while len(x_rows) % alignment:
            x_rows.append(torch.zeros_like(ref.recv_x[0]))
            if ref.recv_scales is not None:
                s_rows.append(torch.zeros_like(ref.recv_scales[0]))
            if ref.recv_topk_weights is not None:
                w_rows.append(0.0)
    ref.expert_counts, ref.expert_ends = counts, ends
    ref.expanded_x = torch.stack(x_rows) if x_rows else ref.recv_x.new_empty((0, *ref.recv_x.shape[1:]))
    if ref.recv_scales is not None:
        ref.expanded_scales = (torch.stack(s_rows) if s_rows
                               else ref.recv_scales.new_empty((0, ref.recv_scales.size(1))))
    if ref.recv_topk_weights is not None:
        ref.expanded_weights = torch.tensor(w_rows, dtype=torch.float32)


def _group_level(values: list, groups: list, dtype: torch.dtype) -> list:
    """One reduction level: each group's values summed in float32 in slot order, rounded once to
    ``dtype`` and placed at the group's last slot; the group's other slots become zero."""
    out = [torch.zeros_like(v) for v in values]
    for g in sorted(set(groups)):
        members = [k for k, gk in enumerate(groups) if gk == g]
        acc = torch.zeros(values[0].shape, dtype=torch.float32)
        for k in members:
            acc = acc + values[k].float()
        out[members[-1]] = acc.to(dtype)
    return out


def ref_v2_combine(y: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, num_ranks: int,
                   ranks_per_node: int, bias: Sequence[torch.Tensor] = (), reduce_in_rank: bool = True,
                   reduce_in_node: bool = False) -> torch.Tensor:
    """DeepEP V2's combine of one source rank's tokens, token by token.

    ``y: [T, K, H]`` holds the expert output of every (token, slot) (zero where the slot is
    ``-1``). Levels, each in float32 in slot order and rounded once to ``y``'s dtype:
    ``reduce_in_rank`` groups slots by the rank owning their expert, ``reduce_in_node`` then by
    node (``ranks_per_node`` ranks each). Slots of unused experts form one group of their own
    (zeros). Finally ``acc = float(bias0) + float(bias1)`` (0 without bias) adds every slot's
    value in slot order; the result is rounded once. Returns ``[T, H]`` in ``y``'s dtype.
    """
    tokens, k, hidden = y.shape
    local = num_experts // num_ranks
    out = torch.empty(tokens, hidden, dtype=y.dtype)
    for t in range(tokens):
        values = [y[t, j] for j in range(k)]
        ids = topk_idx[t].tolist()
        if reduce_in_rank:
            values = _group_level(values, [math.floor(e / local) for e in ids], y.dtype)
        if reduce_in_node:
            values = _group_level(values, [math.floor(e / (local * ranks_per_node)) for e in ids], y.dtype)
        if bias:
            acc = bias[0][t].float()
            for b in bias[1:]:
                acc = acc + b[t].float()
        else:
            acc = torch.zeros(hidden, dtype=torch.float32)
        for j in range(k):
            acc = acc + values[j].float()
        out[t] = acc.to(y.dtype)
    return out


def pre_combine_data(src_global: torch.Tensor, num_max_tokens_per_rank: int, num_topk: int, hidden: int,
                     num_ranks: int, global_seed: int = 0) -> torch.Tensor:
    """DeepEP's deterministic combine test payload: ``[n, K, H]`` bf16 from source ids alone.

    ``y[i, j, c] = sin(((s * 131071) mod (W*T*K) + 1) / (W*T*K) * (c + 1) + sin(global_seed))``
    with ``s = src_global[i] * K + j``; every rank can rebuild the expected combine input.
    """
    seeds = src_global.to(torch.int64).unsqueeze(1) * num_topk + torch.arange(num_topk).unsqueeze(0)
    max_seed = num_ranks * num_max_tokens_per_rank * num_topk
    base = ((seeds * 131071 % max_seed).float() + 1) / max_seed
    cols = torch.arange(1, hidden + 1, dtype=torch.float32)
    return torch.sin(base.unsqueeze(-1) * cols + math.sin(float(global_seed))).to(torch.bfloat16)
