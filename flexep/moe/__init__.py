"""MoE model layer on flexep: a reference expert-parallel layer, expert placement balancing
(EPLB) and checkpoints that load at any EP size.

* :mod:`~flexep.moe.layer` — :class:`MoELayer`, :class:`MoEConfig`, grouped experts;
* :mod:`~flexep.moe.eplb` — replicate hot experts and spread replicas over ranks;
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
    mask_experts,
    replicated_parameters,
)

__all__ = ["MoEConfig", "MoELayer", "GroupedExperts", "deepseek_v3_route", "grouped_mm",
           "expert_parameters", "replicated_parameters", "all_reduce_replicated_grads", "mask_experts"]
