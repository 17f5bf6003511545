"""Traffic accounting: the minimum bytes a routing needs, per link class.

The transport measures what was actually handed to the backend (:class:`TrafficStats.sent`);
this module says what the routing alone requires, from the same count matrices the algorithms
use, so every call can print ``sent / minimum``.

Minimum for the flat algorithm: one copy of a token's row per destination *rank* holding one of
its experts (per-rank dedup). For the hierarchical algorithm: across the network one copy per
destination *node*; inside a node, one copy per destination rank other than the rank through
which the token entered the node. A token's row is its data, its scales, its top-k ids and
weights when they travel, and a 4-byte source index (the receiver's ``recv_src_idx``).

:func:`routing_flows` gives the same counts as pairwise ``[W, W]`` matrices, vectorised for
large groups (the planner's input); :func:`flows_traffic` turns them back into
:func:`routing_traffic`'s result, and the tests hold the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .layout import compute_layout, rank_of_expert
from .topology import Topology
from .transport import LINK_CLASSES

__all__ = ["minimum_bytes", "routing_traffic", "RoutingFlows", "routing_flows", "flows_traffic",
           "link_class_matrix"]


def minimum_bytes(handle, topo: Topology, rank: int, row_bytes: int, reverse: bool = False,
                  cached: bool = False) -> dict:
    """Minimum bytes this rank must send for ``handle``'s routing, per link class.

    ``reverse`` is combine: rows go back from receivers to sources; ``cached`` is a cached
    dispatch. A hierarchical handle defers to its own plan, which knows the per-node dedup.
    """
    if handle.hier is not None:
        return handle.hier.minimum_bytes(topo, rank, row_bytes, reverse, with_mask=not cached)
    out = dict.fromkeys(LINK_CLASSES, 0)
    counts = handle.recv_counts if reverse else handle.send_counts
    for peer, n in enumerate(counts):
        out[topo.link_class(rank, peer)] += n * row_bytes
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
