"""Which ranks share a node, and the process groups built from that.

Ranks are node-major, as in DeepEP: with ``P`` ranks per node, node ``n`` holds group ranks
``n*P .. n*P+P-1`` and local rank ``p`` of every node forms rail ``p`` (the ranks that talk over
the same NIC rail). "Virtual nodes" are just a ``ranks_per_node`` smaller than the real one, so
the hierarchical algorithms can be exercised on one CPU box (2x2, 4x1, 1x4 at world 4).

Resolution order for ``ranks_per_node``: the explicit argument, then ``FLEXEP_RANKS_PER_NODE``,
then ``LOCAL_WORLD_SIZE`` (set by torchrun) when every rank agrees, then the hostnames of the
ranks. Whatever the source, the result is checked against the group size.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from .objects import all_gather_object

__all__ = ["Topology", "resolve_ranks_per_node", "build_topology_groups", "TopologyGroups", "subgroup"]


@dataclass(frozen=True)
class Topology:
    """Node shape of an EP group of ``world_size`` ranks, ``ranks_per_node`` per node."""

    world_size: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.ranks_per_node < 1 or self.world_size % self.ranks_per_node:
            raise ValueError(
                f"ranks_per_node must divide the group size {self.world_size}, "
                f"got {self.ranks_per_node}"
            )

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    @property
    def is_multi_node(self) -> bool:
        return self.num_nodes > 1

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def local_rank_of(self, rank: int) -> int:
        return rank % self.ranks_per_node

    def node_ranks(self, node: int) -> list[int]:
        """Group ranks on ``node``. Example (P = 2): node 1 -> ``[2, 3]``."""
        return list(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))

    def rail_ranks(self, local_rank: int) -> list[int]:
        """Group ranks with local rank ``local_rank``. Example (W = 4, P = 2): 1 -> ``[1, 3]``."""
        return list(range(local_rank, self.world_size, self.ranks_per_node))

    def link_class(self, src: int, dst: int) -> str:
        """``"local"`` (same rank), ``"intra"`` (same node) or ``"inter"`` (crosses the network)."""
        if src == dst:
            return "local"
        return "intra" if self.node_of(src) == self.node_of(dst) else "inter"


def resolve_ranks_per_node(group: dist.ProcessGroup, ranks_per_node: Optional[int] = None,
                           host_group: Optional[dist.ProcessGroup] = None) -> int:
    """Ranks per node for ``group`` (collective unless given explicitly or by env).

    ``host_group``: a CPU-capable group over the same ranks, for the host-name exchange
    (default: ``group`` itself, which must then move CPU tensors).
    """
    world = group.size()
    if ranks_per_node is None and os.environ.get("FLEXEP_RANKS_PER_NODE"):
        ranks_per_node = int(os.environ["FLEXEP_RANKS_PER_NODE"])
    if ranks_per_node is not None:
        if not isinstance(ranks_per_node, int) or isinstance(ranks_per_node, bool):
            raise TypeError(f"ranks_per_node must be an int, got {type(ranks_per_node).__name__}")
        Topology(world, ranks_per_node)  # validates divisibility with a clear message
        return ranks_per_node
    if world == 1:
        return 1
    local_ws = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    names = all_gather_object(host_group or group, (socket.gethostname(), local_ws))
    hosts = [h for h, _ in names]
    local_sizes = {lw for _, lw in names}
    if len(local_sizes) == 1 and 0 < local_ws <= world and world % local_ws == 0:
        return local_ws
    # Hostnames: ranks must come in equal contiguous blocks per host (node-major order).
    per = hosts.count(hosts[0])
    blocks = [hosts[i : i + per] for i in range(0, world, per)]
    if world % per or any(len(set(b)) != 1 for b in blocks) or len({b[0] for b in blocks}) != len(blocks):
        raise ValueError(
            "cannot infer ranks_per_node: ranks are not in equal contiguous blocks per host "
            f"({hosts}); pass Buffer(..., ranks_per_node=P) or set FLEXEP_RANKS_PER_NODE"
        )
    return per


@dataclass(frozen=True)
class TopologyGroups:
    """Process groups for hierarchical exchange, built once per ``Buffer``.

    ``intra``: this rank's node group (P ranks). ``rail``: this rank's rail group (N ranks).
    Group ranks inside ``intra`` are local ranks; inside ``rail`` they are node indices.
    """

    intra: dist.ProcessGroup
    rail: dist.ProcessGroup


def subgroup(group: dist.ProcessGroup, ranks: list[int], backend: Optional[str] = None) -> dist.ProcessGroup:
    """A new process group over ``ranks`` (ranks of ``group``), created by its members only.

    ``backend`` defaults to ``group``'s. Only the members call this (in the same order), so an
    EP group that is a strict subgroup of the world needs nothing from the other ranks.
    """
    global_ranks = dist.get_process_group_ranks(group)
    return dist.new_group([global_ranks[r] for r in ranks], backend=backend or dist.get_backend(group),
                          use_local_synchronization=True)


def build_topology_groups(group: dist.ProcessGroup, topo: Topology) -> TopologyGroups:
    """This rank's node and rail subgroups of ``group`` (collective over each subgroup)."""
    me = group.rank()
    return TopologyGroups(intra=subgroup(group, topo.node_ranks(topo.node_of(me))),
                          rail=subgroup(group, topo.rail_ranks(topo.local_rank_of(me))))
