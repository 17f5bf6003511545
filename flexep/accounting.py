"""Traffic accounting: the minimum bytes a routing needs, per link class.

The transport measures what was actually handed to the backend (:class:`TrafficStats.sent`);
this module says what the routing alone requires, from the same count matrices the algorithms
use, so every call can print ``sent / minimum``.

Minimum for the flat algorithm: one copy of a token's row per destination *rank* holding one of
its experts (per-rank dedup). For the hierarchical algorithm: across the network one copy per
destination *node*; inside a node, one copy per destination rank other than the rank through
which the token entered the node. A token's row is its data, its scales, its top-k ids and
weights when they travel, and a 4-byte source index (the receiver's ``recv_src_idx``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .layout import compute_layout
from .topology import Topology
from .transport import LINK_CLASSES

__all__ = ["minimum_bytes", "routing_traffic"]


def minimum_bytes(handle, topo: Topology, rank: int, row_bytes: int, reverse: bool = False) -> dict:
    """Minimum bytes this rank must send for ``handle``'s routing, per link class.

    ``reverse`` is combine: rows go back from receivers to sources. A hierarchical handle
    defers to its own plan, which knows the per-node dedup.
    """
    if handle.hier is not None:
        return handle.hier.minimum_bytes(topo, rank, row_bytes, reverse)
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
