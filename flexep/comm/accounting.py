"""Traffic accounting: bytes handed to the backend, next to the minimum the routing needs.

Two independent counts meet here:

* **sent**: the transport records every byte it hands to the backend, per peer, classified by
  link (``local`` = this rank, ``intra`` = same node, ``inter`` = across the network), see
  :meth:`TrafficStats.record`;
* **minimum**: what the routing alone requires, computed from the routing's count matrix that
  every rank publishes in the call's control round (``counts[s, d]`` = tokens of rank s with an
  expert on rank d, from ``is_token_in_rank``), never from the algorithm's own send plans. A
  row sent twice, or to a rank that needs none, shows as ``sent / minimum > 1``.

Minimum per call (this rank): flat dispatch sends one row per (token, destination rank)
(per-rank dedup); hierarchical dispatch sends one row per (token, destination node) across the
network, and inside a node one row per (token, destination rank) from the entry rank (a copy
to itself counts as ``local``). Combine sends the same rows back. The bytes of one row are
:func:`wire_row_bytes`.

:func:`routing_traffic` and :func:`routing_flows` give the same minimum for a whole routing
(every rank's ``topk_idx``) without running anything; the planner uses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..layout import compute_layout, rank_of_expert
from .topology import Topology

__all__ = ["LINK_CLASSES", "TrafficStats", "wire_row_bytes", "flat_minimum", "hierarchical_minimum",
           "routing_traffic", "RoutingFlows", "routing_flows", "flows_traffic", "link_class_matrix"]

LINK_CLASSES = ("local", "intra", "inter")


def _zeros() -> dict:
    return dict.fromkeys(LINK_CLASSES, 0)


class TrafficStats:
    """Bytes one call moved, per link class, next to the minimum the routing allows.

    Attributes:
        sent: every byte this rank handed to the transport for a peer (payload and the small
            control messages), per link class.
        payload: the token data among them (rows, their metadata, scales, weights).
        messages: transfers to other ranks.
        minimum: what the routing requires this rank to send (computed on first access).
    """

    def __init__(self) -> None:
        self.sent, self.payload, self.messages = _zeros(), _zeros(), 0
        self._minimum: Optional[dict] = None
        self._minimum_fn: Optional[Callable[[], dict]] = None

    def record(self, link: str, nbytes: int, payload: bool) -> None:
        """Count ``nbytes`` handed to the backend for a peer across ``link``."""
        self.sent[link] += nbytes
        if payload:
            self.payload[link] += nbytes
        if link != "local" and nbytes:
            self.messages += 1

    def reclassify(self, link: str, nbytes: int) -> None:
        """Count ``nbytes`` already recorded as control across ``link`` as payload (a payload
        block that rode in a control round)."""
        self.payload[link] += nbytes

    def set_minimum(self, fn: Callable[[], dict]) -> None:
        """Give the routing's minimum as a function, evaluated only if someone reads it."""
        self._minimum, self._minimum_fn = None, fn

    @property
    def minimum(self) -> dict:
        if self._minimum is None:
            self._minimum = self._minimum_fn() if self._minimum_fn is not None else _zeros()
        return self._minimum

    def ratio(self, link: str = "all") -> float:
        """Payload bytes over the minimum for ``link`` (``"all"`` sums intra and inter)."""
        keys = ("intra", "inter") if link == "all" else (link,)
        got, low = sum(self.payload[k] for k in keys), sum(self.minimum[k] for k in keys)
        return got / low if low else (1.0 if got == 0 else float("inf"))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__, _minimum=self.minimum)  # evaluated: the function stays here
        state["_minimum_fn"] = None
        return state

    def __repr__(self) -> str:
        return f"TrafficStats(sent={self.sent}, payload={self.payload}, messages={self.messages})"


def wire_row_bytes(hidden: int, dtype: torch.dtype, *, scales: Optional[tuple] = None,
                   topk_ids: int = 0, topk_weights: int = 0, src_index: bool = False,
                   mask_bytes: int = 0) -> int:
    """Bytes one token row carries on the wire in normal mode.

    ``hidden`` values of ``dtype``; ``scales = (columns, dtype)`` for FP8; ``topk_ids`` slots of
    int64 expert ids and ``topk_weights`` slots of float32 weights; a 4-byte source index when
    ``src_index``; ``mask_bytes`` of per-rank destination mask (hierarchical dispatch without
    top-k ids).

    Example: hidden 7168 bf16 with 8 top-k ids and weights and the source index:
    14336 + 64 + 32 + 4 = 14436.
    """
    row = hidden * torch.empty((), dtype=dtype).element_size()
    if scales is not None:
        row += scales[0] * torch.empty((), dtype=scales[1]).element_size()
    return row + 8 * topk_ids + 4 * topk_weights + (4 if src_index else 0) + mask_bytes


def flat_minimum(counts: torch.Tensor, topo: Topology, rank: int, row_bytes: int,
                 reverse: bool = False) -> dict:
    """Minimum bytes of a flat call on ``rank``: one row per (token, destination rank).

    ``counts: [W, W]`` routing count matrix (``counts[s, d]`` tokens of s with an expert on d).
    ``reverse`` is combine: rank d returns ``counts[s, d]`` rows to each source s.
    """
    out = _zeros()
    row = counts[:, rank] if reverse else counts[rank]
    for peer, n in enumerate(row.tolist()):
        out[topo.link_class(rank, peer)] += n * row_bytes
    return out


def hierarchical_minimum(counts: torch.Tensor, node_counts: torch.Tensor, topo: Topology, rank: int,
                         row_bytes: int, reverse: bool = False, mask_bytes: int = 0) -> dict:
    """Minimum bytes of a two-hop call on ``rank`` (see the module docstring).

    ``node_counts: [W, N]`` tokens of each rank with an expert on each node. Dispatch: this
    rank sends one row per (token, node) to its rail peer on every node (plus ``mask_bytes`` per
    row when no top-k ids travel), and forwards, inside its node, the rows its rail brought in to
    every other rank of the node that needs them. Combine moves the same rows backwards.
    """
    out = _zeros()
    me_node, me_local = topo.node_of(rank), topo.local_rank_of(rank)
    rail = topo.rail_ranks(me_local)
    node = topo.node_ranks(me_node)
    rail_row = row_bytes + (0 if reverse else mask_bytes)
    for n, peer in enumerate(rail):
        # dispatch: my tokens to node n; combine: the partials of rail peer's tokens for my node
        rows = int(node_counts[peer, me_node]) if reverse else int(node_counts[rank, n])
        out[topo.link_class(rank, peer)] += rows * rail_row
    for d in node:  # d == rank is the entry's own share: a local copy
        # rows entering my node through me (from my rail) that rank d needs
        rows = int(sum(int(counts[s, d]) for s in rail))
        if reverse:  # combine: d returns those rows to me
            rows = int(sum(int(counts[s, rank]) for s in topo.rail_ranks(topo.local_rank_of(d))))
        out[topo.link_class(rank, d)] += rows * row_bytes
    return out


def routing_traffic(topk_idx: Sequence[torch.Tensor], num_experts: int, topo: Topology,
                    row_bytes: int, hierarchical: bool) -> dict:
    """Minimum dispatch bytes of a whole routing, per link class, summed over source ranks.

    ``topk_idx[r]: [T_r, K] int64`` is rank r's routing. Combine moves the same rows back, so
    its minimum is the same with combine's row size. Returns
    ``{"local": B, "intra": B, "inter": B, "per_rank": [W, 3] int64 tensor}`` where
    ``per_rank[r]`` is what rank r sends in each class (forwarded rows count at the forwarder).

    Example (E = 4, W = 4, P = 2, one token on rank 0 choosing experts 2 and 3, row 10 B):
    flat sends to ranks 2 and 3, 20 B inter-node; hierarchical sends once to rank 2 (10 B
    inter) which forwards to rank 3 (10 B intra).
    """
    world = topo.world_size
    per_rank = torch.zeros(world, len(LINK_CLASSES), dtype=torch.int64)
    col = {k: i for i, k in enumerate(LINK_CLASSES)}
    for src, idx in enumerate(topk_idx):
        lay = compute_layout(idx, num_experts, world)
        in_rank = lay.is_token_in_rank  # [T, W]
        if not hierarchical:
            for dst, n in enumerate(in_rank.sum(0).tolist()):
                per_rank[src, col[topo.link_class(src, dst)]] += n * row_bytes
            continue
        p = topo.ranks_per_node
        in_node = in_rank.view(-1, topo.num_nodes, p)  # [T, N, P]
        for node in range(topo.num_nodes):
            entry = node * p + topo.local_rank_of(src)
            reach = in_node[:, node].any(1)  # tokens entering this node
            per_rank[src, col[topo.link_class(src, entry)]] += int(reach.sum()) * row_bytes
            for dst in topo.node_ranks(node):
                if dst != entry:
                    n = int(in_rank[:, dst].sum())
                    per_rank[entry, col[topo.link_class(entry, dst)]] += n * row_bytes
    totals = per_rank.sum(0).tolist()
    return {**{k: totals[i] for k, i in col.items()}, "per_rank": per_rank}


@dataclass(frozen=True)
class RoutingFlows:
    """Rows a routing moves between every pair of ranks, for each algorithm.

    All ``[W, W] int64``, row = sender, column = receiver:

    * ``flat[s, d]``: rows s sends to d in the flat algorithm (its tokens with an expert on d).
    * ``hop1[s, e]``: hierarchical network hop, rows s sends to entry rank e (s's local rank on
      each destination node; ``e == s`` for its own node, a ``local`` transfer).
    * ``hop2[e, d]``: hierarchical forward hop, rows entry e forwards to d inside its node
      (``d != e``: a row whose destination is the entry itself stays there).
    * ``selections[s, d]``: (token, slot) pairs of s choosing an expert on d, i.e. the
      messages of the low-latency mode, which sends once per selected expert.

    Feeding the same matrices to :func:`flows_traffic` reproduces :func:`routing_traffic`.
    """

    flat: torch.Tensor
    hop1: torch.Tensor
    hop2: torch.Tensor
    selections: torch.Tensor


_STACK = 16  # routings laid out per stacked call: bounds the [stack * T, W] mask


def routing_flows(topk_idx: Sequence[torch.Tensor], num_experts: int, topo: Topology) -> RoutingFlows:
    """Pairwise row counts of a whole routing (``topk_idx[r]: [T_r, K] int64``, one per rank).

    Vectorised counterpart of :func:`routing_traffic` for large groups: one layout per
    *distinct* tensor (a list that repeats the same tensor object, as bootstrapped planner
    samples do, costs one layout), then every matrix is built with a few scatters.

    Example (E = 4, W = 4, P = 2, rank 0 has one token choosing experts 2 and 3, the others
    none): ``flat[0] = [0, 0, 1, 1]``, ``hop1[0, 2] = 1`` (enters node 1 at rank 2),
    ``hop2[2, 3] = 1`` (forwarded to rank 3), ``selections[0] = [0, 0, 1, 1]``.
    """
    world, p = topo.world_size, topo.ranks_per_node
    if len(topk_idx) != world:
        raise ValueError(f"topk_idx must hold one routing per rank ({world}), got {len(topk_idx)}")
    # Distinct routings with the same token count are stacked and laid out together (the
    # layout is per token, so a stack's layout is the stack of layouts): few large tensor ops
    # instead of one small layout per rank.
    distinct: dict = {}
    for idx in topk_idx:
        distinct.setdefault(id(idx), idx)
    per_id: dict = {}
    by_len: dict = {}
    for key, idx in distinct.items():
        by_len.setdefault((idx.size(0), idx.size(1) if idx.dim() == 2 else 0), []).append(key)
    for keys in by_len.values():
        for i in range(0, len(keys), _STACK):
            chunk = keys[i:i + _STACK]
            stacked = torch.cat([distinct[k] for k in chunk])
            num_tokens = distinct[chunk[0]].size(0)
            in_rank = compute_layout(stacked, num_experts, world).is_token_in_rank
            in_rank = in_rank.view(len(chunk), num_tokens, world)
            counts = in_rank.sum(1, dtype=torch.int64)
            reach = in_rank.view(len(chunk), num_tokens, topo.num_nodes, p).any(3).sum(1, dtype=torch.int64)
            owner = rank_of_expert(stacked, num_experts, world).view(len(chunk), -1)
            sel = torch.zeros(len(chunk), world + 1, dtype=torch.int64)
            sel.scatter_add_(1, torch.where(owner >= 0, owner, world), torch.ones_like(owner))
            for j, k in enumerate(chunk):
                per_id[k] = (counts[j], reach[j], sel[j, :world])
    rows_c = [per_id[id(idx)][0] for idx in topk_idx]
    rows_r = [per_id[id(idx)][1] for idx in topk_idx]
    rows_s = [per_id[id(idx)][2] for idx in topk_idx]
    counts, reach = torch.stack(rows_c), torch.stack(rows_r)  # [W, W], [W, N]
    src = torch.arange(world)
    local = src % p
    hop1 = torch.zeros(world, world, dtype=torch.int64)
    entry_of_node = torch.arange(topo.num_nodes)[None, :] * p + local[:, None]  # [W, N]
    hop1[src[:, None].expand_as(entry_of_node), entry_of_node] = reach
    # Row s's tokens for destination d enter d's node at s's local rank, then are forwarded.
    entry = (src[None, :] // p) * p + local[:, None]  # [W_src, W_dst]
    dst = src[None, :].expand(world, world)
    hop2 = torch.zeros(world, world, dtype=torch.int64)
    hop2.index_put_((entry, dst), torch.where(entry != dst, counts, 0), accumulate=True)
    return RoutingFlows(flat=counts, hop1=hop1, hop2=hop2, selections=torch.stack(rows_s))


def link_class_matrix(topo: Topology) -> torch.Tensor:
    """``[W, W] int64``: index into ``LINK_CLASSES`` of every (sender, receiver) pair."""
    rank = torch.arange(topo.world_size)
    node = rank // topo.ranks_per_node
    cls = torch.where(node[:, None] == node[None, :], 1, 2)
    return torch.where(rank[:, None] == rank[None, :], 0, cls)


def flows_traffic(flows: RoutingFlows, topo: Topology, row_bytes: int, hierarchical: bool) -> dict:
    """:func:`routing_traffic`'s result computed from :func:`routing_flows` (same keys)."""
    cls = link_class_matrix(topo)
    mats = (flows.hop1, flows.hop2) if hierarchical else (flows.flat,)
    per_rank = torch.zeros(topo.world_size, len(LINK_CLASSES), dtype=torch.int64)
    for m in mats:
        per_rank.scatter_add_(1, cls, m * row_bytes)
    totals = per_rank.sum(0).tolist()
    return {**{k: totals[i] for i, k in enumerate(LINK_CLASSES)}, "per_rank": per_rank}
