"""Expert placement load balancing (EPLB): replicate hot experts and spread replicas over ranks.

Given how many tokens each *logical* expert received (``load: [E]``), choose ``P`` *physical*
expert slots (``P >= E``, ``P`` a multiple of the rank count ``W``; ``P - E`` redundant replicas)
so that the busiest rank does as little work as possible. Rank ``r`` holds the physical slots
``[r * P/W, (r + 1) * P/W)``, the same contiguous layout :class:`~flexep.Buffer` uses, so
dispatching to physical ids needs no change to the communication layer.

Two policies, both greedy and deterministic (no randomness, ties broken by index):

* **hierarchical** (``num_groups`` divisible by ``num_nodes``): pack whole expert groups onto
  nodes (equal group count per node, balanced load), so group-limited routing keeps a token's
  traffic on few nodes; then, inside each node, give extra replicas to the experts with the
  highest load per replica and pack the replicas onto the node's ranks.
* **global** (otherwise, or ``num_nodes == 1``): the same replication and packing over all ranks
  at once.

Packing places heaviest items first on the lightest rank that still has room and, where it can,
does not already hold a replica of the same expert (two replicas on one rank are wasted memory).

Shape legend: E logical experts, P physical slots, W ranks, N nodes, G expert groups,
R = max replicas of one expert, T tokens, K top-k.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["Placement", "replicate", "pack", "global_placement", "hierarchical_placement",
           "rebalance", "rank_loads"]


@dataclass(frozen=True)
class Placement:
    """Where every replica of every logical expert lives.

    Attributes:
        physical_to_logical: ``[P] int64``, logical expert held by physical slot p; rank r holds
            slots ``[r * P/W, (r + 1) * P/W)``.
        logical_to_physical: ``[E, R] int64``, the physical slots of logical expert e (ascending),
            ``-1`` padded.
        replica_counts: ``[E] int64``, replicas of each logical expert (``>= 1``, sums to P).
        num_ranks: W.

    Example (E = 3, W = 2, P = 4, expert 0 hot): ``physical_to_logical = [0, 1, 0, 2]``,
    ``logical_to_physical = [[0, 2], [1, -1], [3, -1]]``, ``replica_counts = [2, 1, 1]``.
    """

    physical_to_logical: torch.Tensor
    logical_to_physical: torch.Tensor
    replica_counts: torch.Tensor
    num_ranks: int

    @property
    def num_logical(self) -> int:
        return self.replica_counts.numel()

    @property
    def num_physical(self) -> int:
        return self.physical_to_logical.numel()

    @property
    def experts_per_rank(self) -> int:
        return self.num_physical // self.num_ranks

    @classmethod
    def identity(cls, num_experts: int, num_ranks: int) -> Placement:
        """No replication: physical slot e holds logical expert e (DeepEP's contiguous layout)."""
        _check_divisible("num_experts", num_experts, "num_ranks", num_ranks)
        return cls.from_physical_to_logical(torch.arange(num_experts), num_experts, num_ranks)

    @classmethod
    def from_physical_to_logical(cls, physical_to_logical: torch.Tensor, num_logical: int,
                                 num_ranks: int) -> Placement:
        """Build the inverse maps from ``physical_to_logical: [P] int64`` and check coverage."""
        p2l = physical_to_logical.to(torch.int64).flatten()
        _check_divisible("number of physical experts", p2l.numel(), "num_ranks", num_ranks)
        if p2l.numel() and (int(p2l.min()) < 0 or int(p2l.max()) >= num_logical):
            raise ValueError(f"physical_to_logical entries must be in [0, {num_logical}), got "
                             f"min {int(p2l.min())}, max {int(p2l.max())}")
        counts = torch.bincount(p2l, minlength=num_logical)
        if bool((counts == 0).any()):
            missing = (counts == 0).nonzero().flatten().tolist()
            raise ValueError(f"every logical expert needs a replica; experts {missing} have none")
        # Slot ids of each expert in ascending order: sort slots by (logical id, slot id).
        order = torch.sort(p2l, stable=True).indices
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(p2l.numel()) - starts.repeat_interleave(counts)
        l2p = torch.full((num_logical, int(counts.max())), -1, dtype=torch.int64)
        l2p[p2l[order], rank_in_expert] = order
        return cls(p2l, l2p, counts, num_ranks)

    def to_physical(self, topk_idx: torch.Tensor, token_offset: int = 0) -> torch.Tensor:
        """Map logical ``topk_idx: [T, K] int64`` (``-1`` unused) to physical slot ids.

        A token picks replica ``(token_offset + t) % replica_counts[e]`` of expert e: one replica
        per token, deterministic, and round-robin so replicas share a batch evenly.

        Example (placement above): ``[[0, 1], [0, 2], [-1, 0]] -> [[0, 1], [2, 3], [-1, 0]]``.
        """
        if topk_idx.dim() != 2:
            raise ValueError(f"topk_idx must be [T, K], got shape {tuple(topk_idx.shape)}")
        valid = topk_idx >= 0
        logical = torch.where(valid, topk_idx, 0)
        token = torch.arange(topk_idx.size(0), device=topk_idx.device).unsqueeze(1) + token_offset
        counts = self.replica_counts.to(topk_idx.device)[logical]
        replica = torch.remainder(token, counts)
        physical = self.logical_to_physical.to(topk_idx.device)[logical, replica]
        return torch.where(valid, physical, -1)


def _check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    if by <= 0 or value % by:
        raise ValueError(f"{name} ({value}) must be divisible by {by_name} ({by})")


def replicate(load: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Replica count per expert, ``[n] int64`` summing to ``num_slots``.

    Every expert gets one replica; each extra one goes to the expert with the highest load per
    replica (ties: lowest index), which minimises the largest load per replica.
    Example: ``load = [6, 1, 3], num_slots = 5 -> [3, 1, 1]`` (6/3 = 2 < 3).
    """
    n = load.numel()
    if num_slots < n:
        raise ValueError(f"num_slots ({num_slots}) must be >= the number of experts ({n})")
    counts = [1] * n
    heap = [(-float(w), i) for i, w in enumerate(load.tolist())]
    heapq.heapify(heap)
    for _ in range(num_slots - n):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (-float(load[i]) / counts[i], i))
    return torch.tensor(counts, dtype=torch.int64)


def pack(weights: Sequence[float], num_packs: int, labels: Optional[Sequence[int]] = None
         ) -> list[list[int]]:
    """Split items into ``num_packs`` packs of equal size, balancing the summed weights.

    Heaviest item first, each into the lightest pack with room; with ``labels`` a pack already
    holding an item of the same label is avoided when another pack has room. Returns the item
    indices of each pack, ascending. Example: ``[5, 4, 3, 2], 2 -> [[0, 3], [1, 2]]``.
    """
    n = len(weights)
    _check_divisible("number of items", n, "num_packs", num_packs)
    size = n // num_packs
    packs: list[list[int]] = [[] for _ in range(num_packs)]
    totals = [0.0] * num_packs
    held: list[set] = [set() for _ in range(num_packs)]
    for i in sorted(range(n), key=lambda j: (-float(weights[j]), j)):
        open_packs = [p for p in range(num_packs) if len(packs[p]) < size]
        if labels is not None:
            fresh = [p for p in open_packs if labels[i] not in held[p]]
            open_packs = fresh or open_packs
        p = min(open_packs, key=lambda q: (totals[q], q))
        packs[p].append(i)
        totals[p] += float(weights[i])
        if labels is not None:
            held[p].add(labels[i])
    return [sorted(p) for p in packs]


def _place_within(load: torch.Tensor, experts: list[int], num_slots: int, num_ranks: int
                  ) -> list[list[int]]:
    """Replicate ``experts`` (logical ids) into ``num_slots`` slots packed onto ``num_ranks``.

    Returns, per rank, the logical expert of each of its slots (sorted by logical id).
    """
    sub = load[experts].double()
    counts = replicate(sub, num_slots)
    labels = [e for e, c in zip(experts, counts.tolist()) for _ in range(c)]
    weights = [float(load[e]) / c for e, c in zip(experts, counts.tolist()) for _ in range(c)]
    return [sorted(labels[i] for i in p) for p in pack(weights, num_ranks, labels)]


def _validate(load: torch.Tensor, num_physical: int, num_ranks: int) -> torch.Tensor:
    if not isinstance(load, torch.Tensor) or load.dim() != 1:
        raise ValueError(f"load must be a 1-D tensor [num_experts], got "
                         f"{tuple(load.shape) if isinstance(load, torch.Tensor) else type(load).__name__}")
    if bool((load < 0).any()):
        raise ValueError("load must be non-negative")
    _check_divisible("num_physical", num_physical, "num_ranks", num_ranks)
    if num_physical < load.numel():
        raise ValueError(f"num_physical ({num_physical}) must be >= num_experts ({load.numel()})")
    return load.detach().double().cpu()


def global_placement(load: torch.Tensor, num_physical: int, num_ranks: int) -> Placement:
    """Replicate and pack over all ranks at once (``load: [E]``, any non-negative numbers)."""
    load = _validate(load, num_physical, num_ranks)
    ranks = _place_within(load, list(range(load.numel())), num_physical, num_ranks)
    return Placement.from_physical_to_logical(torch.tensor(sum(ranks, [])), load.numel(), num_ranks)


def hierarchical_placement(load: torch.Tensor, num_physical: int, num_ranks: int, num_groups: int,
                           num_nodes: int) -> Placement:
    """Groups to nodes, then replicas to ranks inside each node (``load: [E]``).

    Experts ``[g * E/G, (g + 1) * E/G)`` form group g. Each node gets ``G/N`` whole groups and
    ``P/N`` slots, so a node's experts (and their replicas) never leave it.
    """
    load = _validate(load, num_physical, num_ranks)
    num_experts = load.numel()
    _check_divisible("num_experts", num_experts, "num_groups", num_groups)
    _check_divisible("num_groups", num_groups, "num_nodes", num_nodes)
    _check_divisible("num_ranks", num_ranks, "num_nodes", num_nodes)
    _check_divisible("num_physical", num_physical, "num_ranks", num_ranks)
    group_size = num_experts // num_groups
    group_load = load.view(num_groups, group_size).sum(1).tolist()
    slots = []
    for groups in pack(group_load, num_nodes):
        experts = [g * group_size + i for g in groups for i in range(group_size)]
        slots += sum(_place_within(load, experts, num_physical // num_nodes, num_ranks // num_nodes), [])
    return Placement.from_physical_to_logical(torch.tensor(slots), num_experts, num_ranks)


def rebalance(load: torch.Tensor, num_physical: int, num_ranks: int, num_groups: int = 1,
              num_nodes: int = 1) -> Placement:
    """Pick the policy: hierarchical when groups split evenly over several nodes, else global."""
    if num_nodes > 1 and num_groups % num_nodes == 0:
        return hierarchical_placement(load, num_physical, num_ranks, num_groups, num_nodes)
    return global_placement(load, num_physical, num_ranks)


def rank_loads(load: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Expected tokens per rank, ``[W] float64``, each expert's load split evenly over replicas."""
    per_slot = load.double().cpu()[placement.physical_to_logical] / \
        placement.replica_counts.double()[placement.physical_to_logical]
    return per_slot.view(placement.num_ranks, -1).sum(1)
