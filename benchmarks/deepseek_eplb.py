"""DeepSeek's expert-parallel load balancer, restated from its description: the baseline of
``eplb_balance.py`` and of ``tests/test_eplb.py``.

DeepSeek's EPLB (github.com/deepseek-ai/EPLB, ``rebalance_experts``) works on float32 loads:

* **hierarchical policy** (the number of expert groups divisible by the number of nodes):
  1. groups go to nodes by *balanced packing*: groups by descending load, each to the lightest
     node that still has room for one (every node takes G/N groups);
  2. inside each node, its experts (ordered by the node's groups in the order they arrived, then
     by id) get replicas: each of the node's ``P/N - E/N`` extra slots goes to the expert with
     the largest load per replica (first in that order on ties);
  3. the node's replicas (load / replica count each) are balanced-packed onto its ``W/N`` ranks
     in the same way, each rank taking ``P/W`` of them. With one item per pack the packing is
     the identity, without sorting.
* **global policy** (otherwise): the same with one group and one node.

Written independently of :mod:`flexep.moe.balance`; the two share nothing but the idea. Returns
``physical_to_logical`` as a list, rank ``r`` holding slots ``[r * P/W, (r + 1) * P/W)``.
"""

from __future__ import annotations

import torch

__all__ = ["deepseek_rebalance"]


def _balanced_packing(weights: list, num_packs: int) -> list[list[int]]:
    """Item ids per pack (in arrival order); ``weights`` are float32 0-dim tensors."""
    per_pack = len(weights) // num_packs
    if per_pack == 1:
        return [[i] for i in range(len(weights))]
    order = sorted(range(len(weights)), key=lambda i: (-float(weights[i]), i))
    packs: list[list[int]] = [[] for _ in range(num_packs)]
    totals = [torch.zeros((), dtype=torch.float32) for _ in range(num_packs)]
    for i in order:
        open_packs = [p for p in range(num_packs) if len(packs[p]) < per_pack]
        target = open_packs[0]
        for p in open_packs[1:]:
            if float(totals[p]) < float(totals[target]):
                target = p
        packs[target].append(i)
        totals[target] = totals[target] + weights[i]
    return packs


def _replicate(weights: list, num_slots: int) -> tuple[list[int], list[int]]:
    """(expert position of each slot: one per expert, then the extras in order; counts)."""
    counts = [1] * len(weights)
    slots = list(range(len(weights)))
    for _ in range(num_slots - len(weights)):
        per_replica = [w / c for w, c in zip(weights, counts)]
        best = 0
        for i in range(1, len(weights)):
            if float(per_replica[i]) > float(per_replica[best]):
                best = i
        slots.append(best)
        counts[best] += 1
    return slots, counts


def deepseek_rebalance(load: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
                       num_ranks: int) -> list[int]:
    """DeepSeek's placement of ``load: [E]`` on ``num_ranks`` ranks (see the module docstring)."""
    w = [t.reshape(()) for t in load.float().cpu().split(1)]  # float32, as DeepSeek computes
    num_experts = len(w)
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    group_size = num_experts // num_groups
    group_load = [sum(w[g * group_size + 1:(g + 1) * group_size], w[g * group_size])
                  for g in range(num_groups)]
    ranks_per_node = num_ranks // num_nodes
    slots_per_rank = num_physical // num_ranks
    physical_to_logical: list[int] = []
    for groups in _balanced_packing(group_load, num_nodes):
        experts = [g * group_size + i for g in groups for i in range(group_size)]
        slots, counts = _replicate([w[e] for e in experts], num_physical // num_nodes)
        replica_load = [w[experts[s]] / counts[s] for s in slots]
        for rank in _balanced_packing(replica_load, ranks_per_node):
            assert len(rank) == slots_per_rank
            physical_to_logical += [experts[slots[i]] for i in rank]
    return physical_to_logical
