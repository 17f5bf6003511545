"""MoE model layer on flexep: a reference expert-parallel layer, expert placement balancing
(EPLB) and checkpoints that load at any EP size.

* :mod:`~flexep.moe.layer` — :class:`MoELayer`, :class:`MoEConfig`, grouped experts;
* :mod:`~flexep.moe.eplb` — replicate hot experts and spread replicas over ranks;
* :mod:`~flexep.moe.replicas` — replicas that train as one expert (gradients reduced onto the
  primary, copies kept equal: DeepEP V2.5's load-balancing transfers);
* :mod:`~flexep.moe.checkpoint` — save on N ranks, load on M.
"""

from .layer import (
    GroupedExperts,
    MoEConfig,
    MoELayer,
    all_reduce_replicated_grads,
    deepseek_v3_route,
    expert_parameters,
    grouped_mm,
    replicated_parameters,
)
from .replicas import ReplicaMap, replica_map, sync_replica_grads, sync_replica_weights

__all__ = ["MoEConfig", "MoELayer", "GroupedExperts", "deepseek_v3_route", "grouped_mm",
           "expert_parameters", "replicated_parameters", "all_reduce_replicated_grads", "ReplicaMap",
           "replica_map", "sync_replica_grads", "sync_replica_weights"]
