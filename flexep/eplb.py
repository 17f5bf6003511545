"""Stable import path: expert placement balancing lives in :mod:`flexep.moe.eplb`."""

from .moe.eplb import (
    Placement,
    align_ranks,
    global_placement,
    hierarchical_placement,
    pack,
    rank_loads,
    rebalance,
    replicate,
)
from .moe.replicas import ReplicaMap, replica_map, sync_replica_grads, sync_replica_weights

__all__ = ["Placement", "replicate", "pack", "global_placement", "hierarchical_placement", "rebalance",
           "align_ranks", "rank_loads", "ReplicaMap", "replica_map", "sync_replica_grads",
           "sync_replica_weights"]
