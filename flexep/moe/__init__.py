"""MoE model layer on flexep: the served models' routing rules, a reference expert-parallel
layer, expert placement balancing (EPLB) that can change while serving, and checkpoints that
load at any EP size.

* :mod:`~flexep.moe.routing` — :func:`route` with DeepSeek-V3/V2, Qwen/Mixtral and gpt-oss rules;
* :mod:`~flexep.moe.config` — :class:`MoEConfig` and presets of served models;
* :mod:`~flexep.moe.layer` — :class:`MoELayer`, grouped experts;
* :mod:`~flexep.moe.eplb` — replicate hot experts and spread replicas over ranks
  (:mod:`~flexep.moe.balance` holds the packing arithmetic);
* :mod:`~flexep.moe.weights` — fetch rows from their owners, reduce rows onto them;
* :mod:`~flexep.moe.online` — re-place a serving layer's experts from its observed load;
* :mod:`~flexep.moe.replicas` — replicas that train as one expert (gradients reduced onto the
  primary, copies kept equal: DeepEP V2.5's load-balancing transfers);
* :mod:`~flexep.moe.checkpoint` — save on N ranks, load on M.
"""

from .config import PRESETS, MoEConfig
from .layer import (
    GroupedExperts,
    MoELayer,
    all_reduce_replicated_grads,
    deepseek_v3_route,
    expert_parameters,
    grouped_mm,
    mask_experts,
    replicated_parameters,
)
from .online import Moved, RebalanceReport
from .replicas import ReplicaMap, replica_map, sync_replica_grads, sync_replica_weights
from .routing import RULES, route
from .weights import FetchPlan, ReducePlan, fetch_rows, plan_fetch, plan_reduce, reduce_rows

__all__ = ["MoEConfig", "PRESETS", "MoELayer", "GroupedExperts", "route", "RULES", "deepseek_v3_route",
           "grouped_mm", "expert_parameters", "replicated_parameters", "all_reduce_replicated_grads",
           "RebalanceReport", "Moved", "FetchPlan", "ReducePlan", "plan_fetch", "fetch_rows", "plan_reduce",
           "reduce_rows", "ReplicaMap", "replica_map", "sync_replica_grads", "sync_replica_weights",
           "mask_experts"]
