"""The arithmetic of expert placement: how many replicas per expert, and which rank holds which.

Pure Python on host lists (loads are statistics, not device data). :mod:`flexep.moe.eplb` builds
its placement policies from three steps:

* :func:`replicate_counts` — replica counts that minimise the largest load per replica;
* :func:`greedy_pack` — heaviest item first into the lightest pack with room, which is the
  packing DeepSeek's EPLB uses (``balanced_packing``);
* :func:`refine_pack` — local search after the greedy: swap items between the heaviest pack and
  the others while that lowers the heaviest load, then (:func:`spread_labels`) swap away
  replicas of one expert that share a rank wherever the heaviest load does not rise.

:func:`pack` chains them. The refinement only ever accepts a lower maximum, so a refined packing
is never less balanced than the greedy one it starts from.
"""

from __future__ import annotations

import heapq
from typing import Optional, Sequence

__all__ = ["replicate_counts", "greedy_pack", "refine_pack", "spread_labels", "pack", "pack_loads",
           "colocated"]

# A swap must lower the heaviest load by more than this fraction of the total to count: floating
# sums drift in the last bits and a search must not chase that noise.
REL_TOL = 1e-12


def replicate_counts(load: Sequence[float], num_slots: int) -> list[int]:
    """Replica count per expert, summing to ``num_slots`` (one each, then greedy).

    Each extra replica goes to the expert with the highest load per replica (ties: lowest
    index), which minimises the largest load per replica.
    Example: ``load = [6, 1, 3], num_slots = 5 -> [3, 1, 1]`` (6/3 = 2 < 3).
    """
    n = len(load)
    if num_slots < n:
        raise ValueError(f"num_slots ({num_slots}) must be >= the number of experts ({n})")
    counts = [1] * n
    heap = [(-float(w), i) for i, w in enumerate(load)]
    heapq.heapify(heap)
    for _ in range(num_slots - n):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (-float(load[i]) / counts[i], i))
    return counts


def _check_items(n: int, num_packs: int) -> int:
    if num_packs <= 0 or n % num_packs:
        raise ValueError(f"number of items ({n}) must be divisible by num_packs ({num_packs})")
    return n // num_packs


def greedy_pack(weights: Sequence[float], num_packs: int, labels: Optional[Sequence[int]] = None
                ) -> list[list[int]]:
    """Equal-size packs by the greedy rule: heaviest item first, into the lightest open pack.

    With ``labels``, an open pack that holds no item of the same label is preferred when there
    is one. Ties: items of equal weight by index, packs of equal load by index. Returns the
    items of each pack in placement order. Example: ``[5, 4, 3, 2], 2 -> [[0, 3], [1, 2]]``.
    """
    size = _check_items(len(weights), num_packs)
    packs: list[list[int]] = [[] for _ in range(num_packs)]
    totals = [0.0] * num_packs
    held: list[set] = [set() for _ in range(num_packs)]
    for i in sorted(range(len(weights)), key=lambda j: (-float(weights[j]), j)):
        open_packs = [q for q in range(num_packs) if len(packs[q]) < size]
        if labels is not None:
            open_packs = [q for q in open_packs if labels[i] not in held[q]] or open_packs
        p = min(open_packs, key=lambda q: (totals[q], q))
        packs[p].append(i)
        totals[p] += float(weights[i])
        if labels is not None:
            held[p].add(labels[i])
    return packs


def pack_loads(weights: Sequence[float], packs: Sequence[Sequence[int]]) -> list[float]:
    """Summed weight of each pack (in item order, so equal packs give equal sums)."""
    return [sum(float(weights[i]) for i in sorted(p)) for p in packs]


def colocated(labels: Sequence[int], packs: Sequence[Sequence[int]]) -> int:
    """How many items share a pack with an earlier item of the same label (wasted slots)."""
    return sum(len(p) - len({labels[i] for i in p}) for p in packs)


def refine_pack(weights: Sequence[float], packs: Sequence[Sequence[int]],
                labels: Optional[Sequence[int]] = None, *, prefer_apart: bool = True) -> list[list[int]]:
    """Improve a packing by pairwise swaps; returns new packs (sizes unchanged).

    1. **Balance.** While some swap of an item of the heaviest pack with a lighter item of
       another pack leaves both packs below the heaviest load, make the swap that leaves the
       lower of the two maxima (ties: first found); with ``labels`` and ``prefer_apart``, a swap
       that puts no two items of one label together is taken before any that does. Each swap
       lowers the sorted load vector, so the loop ends; the heaviest load never rises.
    2. **Spread replicas** (with ``labels``): :func:`spread_labels` up to the heaviest load.
    """
    w = [float(x) for x in weights]
    packs = [list(p) for p in packs]
    loads = pack_loads(w, packs)
    tol = REL_TOL * max(sum(w), 1e-300)
    apart = labels is not None and prefer_apart
    while True:
        h = max(range(len(packs)), key=lambda q: (loads[q], -q))
        best = None
        for a, i in enumerate(packs[h]):
            for p, members in enumerate(packs):
                if p == h:
                    continue
                for b, j in enumerate(members):
                    d = w[i] - w[j]
                    if d <= 0:
                        continue
                    worst = max(loads[h] - d, loads[p] + d)
                    if worst >= loads[h] - tol:
                        continue
                    key = (apart and _joins(labels, packs, h, a, p, b), worst)
                    if best is None or key < best[0]:
                        best = (key, a, p, b)
        if best is None:
            break
        _, a, p, b = best
        _swap(w, packs, loads, h, a, p, b)
    if labels is not None:
        packs = spread_labels(w, packs, labels, max(loads))
    return packs


def _joins(labels: Sequence[int], packs: list[list[int]], p: int, a: int, q: int, b: int) -> bool:
    """Whether swapping ``packs[p][a]`` with ``packs[q][b]`` puts an item next to its label."""
    i, j = packs[p][a], packs[q][b]
    return (any(labels[k] == labels[j] for k in packs[p] if k != i)
            or any(labels[k] == labels[i] for k in packs[q] if k != j))


def _swap(w: list[float], packs: list[list[int]], loads: list[float], p: int, a: int, q: int,
          b: int) -> None:
    i, j = packs[p][a], packs[q][b]
    packs[p][a], packs[q][b] = j, i
    loads[p] += w[j] - w[i]
    loads[q] += w[i] - w[j]


def spread_labels(weights: Sequence[float], packs: Sequence[Sequence[int]], labels: Sequence[int],
                  limit: float) -> list[list[int]]:
    """Step 2 of :func:`refine_pack` with an explicit ceiling: returns new packs.

    Swaps apart items of one label that share a pack while no pack exceeds ``limit`` (the
    hierarchical policy passes the busiest rank of the whole placement, so a node that is not
    the busiest may use its slack). Every swap removes one co-located pair and adds none.
    """
    w = [float(x) for x in weights]
    packs = [list(p) for p in packs]
    loads = pack_loads(w, packs)
    while True:
        best = None
        for p, members in enumerate(packs):
            held = [labels[i] for i in members]
            for a, i in enumerate(members):
                if held.count(labels[i]) < 2:
                    continue
                for q, others in enumerate(packs):
                    if q == p or labels[i] in (labels[j] for j in others):
                        continue
                    for b, j in enumerate(others):
                        if labels[j] in held:
                            continue
                        d = w[i] - w[j]
                        worst = max(loads[p] - d, loads[q] + d)
                        if worst <= limit and (best is None or worst < best[0]):
                            best = (worst, p, a, q, b)
        if best is None:
            return packs
        _, p, a, q, b = best
        _swap(w, packs, loads, p, a, q, b)


def pack(weights: Sequence[float], num_packs: int, labels: Optional[Sequence[int]] = None, *,
         refine: bool = True) -> list[list[int]]:
    """Split items into ``num_packs`` packs of equal size, balancing the summed weights.

    ``refine=False``: :func:`greedy_pack` without labels, which is DeepSeek's packing.
    ``refine=True``: the plain greedy improved by :func:`refine_pack` for balance alone and,
    with ``labels``, also preferring swaps that keep labels apart, and the label-avoiding
    greedy improved the same way; the result with the lower heaviest load wins, then the one
    with fewer co-located labels. Returns the item indices of each pack, ascending.
    Example: ``[5, 4, 3, 2], 2 -> [[0, 3], [1, 2]]``.
    """
    if not refine:
        return [sorted(p) for p in greedy_pack(weights, num_packs)]
    plain = greedy_pack(weights, num_packs)
    runs = [(plain, False)]
    if labels is not None:
        runs += [(plain, True), (greedy_pack(weights, num_packs, labels), True)]
    best = None
    for start, apart in runs:
        packs = [sorted(p) for p in refine_pack(weights, start, labels, prefer_apart=apart)]
        key = (max(pack_loads(weights, packs)), colocated(labels, packs) if labels is not None else 0)
        if best is None or key < best[0]:
            best = (key, packs)
    return best[1]
