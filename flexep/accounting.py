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

from .topology import Topology
from .transport import LINK_CLASSES

__all__ = ["minimum_bytes"]


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
