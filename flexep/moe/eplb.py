"""Expert placement load balancing (EPLB): replicate hot experts and spread replicas over ranks.

Given how many tokens each *logical* expert received (``load: [E]``), choose ``P`` *physical*
expert slots (``P >= E``, ``P`` a multiple of the rank count ``W``; ``P - E`` redundant replicas)
so that the busiest rank does as little work as possible. Rank ``r`` holds the physical slots
``[r * P/W, (r + 1) * P/W)``, the same contiguous layout :class:`~flexep.Buffer` uses, so
dispatching to physical ids needs no change to the communication layer.

Two policies, as DeepSeek's EPLB (``rebalance_experts``), deterministic (ties by index):

* **hierarchical** (``num_groups`` divisible by ``num_nodes``): pack whole expert groups onto
  nodes (equal group count per node, balanced load), so group-limited routing keeps a token's
  traffic on few nodes; then, inside each node, give extra replicas to the experts with the
  highest load per replica and pack the replicas onto the node's ranks.
* **global** (otherwise, or ``num_nodes == 1``): the same replication and packing over all ranks
  at once.

Packing is DeepSeek's greedy (heaviest item first onto the lightest rank with room); with
``refine=False`` the policies are DeepSeek's algorithm. ``refine=True`` (default) improves the
greedy by swaps (:mod:`flexep.moe.balance`): items between the busiest rank and the others,
whole groups between the node of the busiest rank and the others, then replicas of one expert
that share a rank are separated wherever the busiest rank does not get busier (two replicas on
one rank hold one expert's memory twice). A swap is taken only when it lowers the busiest rank,
so a refined placement is never less balanced than DeepSeek's.

Shape legend: E logical experts, P physical slots, W ranks, N nodes, G expert groups,
R = max replicas of one expert, T tokens, K top-k.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch

from .balance import REL_TOL, colocated, greedy_pack, pack, pack_loads, replicate_counts, spread_labels

__all__ = ["Placement", "replicate", "pack", "global_placement", "hierarchical_placement",
           "rebalance", "align_ranks", "rank_loads"]


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
    return torch.tensor(replicate_counts([float(w) for w in load.tolist()], num_slots), dtype=torch.int64)


@dataclass(frozen=True)
class _Node:
    """Replicas of some experts packed onto some ranks (host lists)."""

    weights: list  # load per replica
    labels: list  # logical expert of each replica
    packs: list  # replica indices per rank
    heaviest: float  # busiest rank's load
    colocated: int

    def ranks(self) -> list[list[int]]:
        return [sorted(self.labels[i] for i in p) for p in self.packs]


def _place_within(load: list[float], experts: Sequence[int], num_slots: int, num_ranks: int,
                  refine: bool) -> _Node:
    """Replicate ``experts`` (logical ids) into ``num_slots`` slots and pack them onto ``num_ranks``."""
    counts = replicate_counts([load[e] for e in experts], num_slots)
    labels = [e for e, c in zip(experts, counts) for _ in range(c)]
    weights = [load[e] / c for e, c in zip(experts, counts) for _ in range(c)]
    packs = pack(weights, num_ranks, labels, refine=refine)
    return _Node(weights, labels, packs, max(pack_loads(weights, packs)), colocated(labels, packs))


def _validate(load: torch.Tensor, num_physical: int, num_ranks: int) -> list[float]:
    if not isinstance(load, torch.Tensor) or load.dim() != 1:
        raise ValueError(f"load must be a 1-D tensor [num_experts], got "
                         f"{tuple(load.shape) if isinstance(load, torch.Tensor) else type(load).__name__}")
    if load.is_floating_point() and not bool(torch.isfinite(load).all()):
        raise ValueError("load must be finite")
    if bool((load < 0).any()):
        raise ValueError("load must be non-negative")
    _check_divisible("num_physical", num_physical, "num_ranks", num_ranks)
    if num_physical < load.numel():
        raise ValueError(f"num_physical ({num_physical}) must be >= num_experts ({load.numel()})")
    return [float(w) for w in load.detach().double().cpu().tolist()]


def _placement(ranks: list[list[int]], num_experts: int, num_ranks: int) -> Placement:
    return Placement.from_physical_to_logical(torch.tensor(sum(ranks, [])), num_experts, num_ranks)


def global_placement(load: torch.Tensor, num_physical: int, num_ranks: int, *,
                     refine: bool = True) -> Placement:
    """Replicate and pack over all ranks at once (``load: [E]``, any non-negative numbers).

    ``refine=False`` is DeepSeek's global policy (greedy packing only).
    """
    values = _validate(load, num_physical, num_ranks)
    node = _place_within(values, range(len(values)), num_physical, num_ranks, refine)
    return _placement(node.ranks(), len(values), num_ranks)


def hierarchical_placement(load: torch.Tensor, num_physical: int, num_ranks: int, num_groups: int,
                           num_nodes: int, *, refine: bool = True) -> Placement:
    """Groups to nodes, then replicas to ranks inside each node (``load: [E]``).

    Experts ``[g * E/G, (g + 1) * E/G)`` form group g. Each node gets ``G/N`` whole groups and
    ``P/N`` slots, so a node's experts (and their replicas) never leave it. Groups go to nodes
    by the greedy packing of their loads; with ``refine``, whole groups are then swapped
    between the node holding the busiest rank and the others while that lowers the busiest
    rank's load (each node re-placed), and every node's packing is refined
    (:func:`~flexep.moe.balance.refine_pack`). ``refine=False`` is DeepSeek's hierarchical policy.
    """
    values = _validate(load, num_physical, num_ranks)
    num_experts = len(values)
    _check_divisible("num_experts", num_experts, "num_groups", num_groups)
    _check_divisible("num_groups", num_groups, "num_nodes", num_nodes)
    _check_divisible("num_ranks", num_ranks, "num_nodes", num_nodes)
    size = num_experts // num_groups
    group_load = [sum(values[g * size:(g + 1) * size]) for g in range(num_groups)]
    cache: dict = {}

    def node(groups: tuple) -> _Node:
        if groups not in cache:
            experts = [g * size + i for g in groups for i in range(size)]
            cache[groups] = _place_within(values, experts, num_physical // num_nodes,
                                          num_ranks // num_nodes, refine)
        return cache[groups]

    assignment = [tuple(sorted(p)) for p in greedy_pack(group_load, num_nodes)]
    if refine:
        assignment = _swap_groups(assignment, node)
    nodes = [node(groups) for groups in assignment]
    if refine:
        # Replicas may use a node's slack up to the busiest rank of the whole placement.
        limit = max(n.heaviest for n in nodes)
        nodes = [replace(n, packs=spread_labels(n.weights, n.packs, n.labels, limit)) for n in nodes]
    return _placement(sum((n.ranks() for n in nodes), []), num_experts, num_ranks)


def _swap_groups(assignment: list[tuple], node: Callable[[tuple], _Node]) -> list[tuple]:
    """Swap whole groups between the node holding the busiest rank and the others while that
    rank gets lighter; the swap leaving the lighter of the two nodes' busiest ranks wins."""
    assignment = list(assignment)
    while True:
        h = max(range(len(assignment)), key=lambda n: (node(assignment[n]).heaviest, -n))
        now = node(assignment[h]).heaviest
        best = None
        for n, theirs in enumerate(assignment):
            for a in assignment[h] if n != h else ():
                for b in theirs:
                    mine_new = tuple(sorted(set(assignment[h]) - {a} | {b}))
                    theirs_new = tuple(sorted(set(theirs) - {b} | {a}))
                    worst = max(node(mine_new).heaviest, node(theirs_new).heaviest)
                    if worst < now * (1 - REL_TOL) and (best is None or worst < best[0]):
                        best = (worst, n, mine_new, theirs_new)
        if best is None:
            return assignment
        _, n, assignment[h], assignment[n] = best


def rebalance(load: torch.Tensor, num_physical: int, num_ranks: int, num_groups: int = 1,
              num_nodes: int = 1, *, refine: bool = True, current: Optional[Placement] = None) -> Placement:
    """Pick the policy: hierarchical when groups split evenly over several nodes, else global.

    With ``current`` (the placement in effect), the result's ranks are relabelled to keep as
    many experts where they are as the policy allows (:func:`align_ranks`): the same balance,
    fewer weights to move.
    """
    if num_nodes > 1 and num_groups % num_nodes == 0:
        new = hierarchical_placement(load, num_physical, num_ranks, num_groups, num_nodes, refine=refine)
        block = num_ranks // num_nodes
    else:
        new, block = global_placement(load, num_physical, num_ranks, refine=refine), num_ranks
    return new if current is None else align_ranks(new, current, block)


def align_ranks(new: Placement, current: Placement, block: int) -> Placement:
    """``new`` with its ranks permuted to overlap ``current`` as much as a greedy matching finds.

    Ranks move as blocks of ``block`` consecutive ranks (nodes: a hierarchical placement keeps
    each node's groups together), then inside each block. Every rank keeps its set of experts,
    so rank loads are only permuted. Overlap counts the experts a rank would not have to fetch.

    Example (W = 2, block 2): current ``[0, 1 | 2, 3]``, new ``[2, 3 | 0, 1]`` -> ``[0, 1 | 2, 3]``.
    """
    if new.num_ranks != current.num_ranks:
        raise ValueError(f"current has {current.num_ranks} ranks, new has {new.num_ranks}")
    _check_divisible("num_ranks", new.num_ranks, "block", block)
    mine = [Counter(r) for r in new.physical_to_logical.view(new.num_ranks, -1).tolist()]
    theirs = [Counter(r) for r in current.physical_to_logical.view(current.num_ranks, -1).tolist()]

    def overlap(a: Counter, b: Counter) -> int:
        return sum((a & b).values())

    blocks = range(new.num_ranks // block)
    node_of = _match(blocks, blocks, lambda a, b: overlap(
        sum((mine[a * block + i] for i in range(block)), Counter()),
        sum((theirs[b * block + i] for i in range(block)), Counter())))
    order = [0] * new.num_ranks  # order[target rank] = rank of new that moves there
    for a, b in node_of.items():
        inner = _match(range(block), range(block),
                       lambda i, j, a=a, b=b: overlap(mine[a * block + i], theirs[b * block + j]))
        for i, j in inner.items():
            order[b * block + j] = a * block + i
    p2l = new.physical_to_logical.view(new.num_ranks, -1)[order].flatten()
    return Placement.from_physical_to_logical(p2l, new.num_logical, new.num_ranks)


def _match(sources: range, targets: range, score: Callable[[int, int], int]) -> dict:
    """Greedy maximum-overlap matching: pairs by descending score (ties: lower ids first)."""
    pairs = sorted(((score(a, b), a, b) for a in sources for b in targets), key=lambda t: (-t[0], t[1], t[2]))
    out: dict = {}
    used: set = set()
    for _, a, b in pairs:
        if a not in out and b not in used:
            out[a] = b
            used.add(b)
    return out


def rank_loads(load: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Expected tokens per rank, ``[W] float64``, each expert's load split evenly over replicas."""
    per_slot = load.double().cpu()[placement.physical_to_logical] / \
        placement.replica_counts.double()[placement.physical_to_logical]
    return per_slot.view(placement.num_ranks, -1).sum(1)
