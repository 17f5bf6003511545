"""Stable import path: topology lives in :mod:`flexep.comm.topology`."""

from .comm.topology import Topology, TopologyGroups, build_topology_groups, resolve_ranks_per_node

__all__ = ["Topology", "TopologyGroups", "build_topology_groups", "resolve_ranks_per_node"]
