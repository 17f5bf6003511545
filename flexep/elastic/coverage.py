"""Expert coverage after a membership change: a new placement and where each slot's weights come from.

After ranks are lost (or join), every logical expert needs a live copy on the new group.
:func:`plan_placement` is EPLB (:mod:`flexep.moe.eplb`) made *sticky*: the replica counts are
EPLB's for the new slot count, but each rank first keeps the experts it already holds, so only
the experts of the lost ranks (and new replicas) move. :func:`plan_sources` then names, for every
new slot, where its weights come from:

* the rank itself (it already holds the expert): a local copy;
* another rank holding a copy (a surviving replica, or the expert's old home when the group
  grows): moved in one all-to-all of whole expert rows over the new group, a fetch of
  :mod:`flexep.moe.weights` whose plan every rank builds locally from the agreed holdings
  (:func:`plan_moves`, :func:`move_rows`);
* nobody (every copy was on lost ranks): ``MISSING``; the caller reads it from the last
  checkpoint (:func:`flexep.moe.checkpoint.read_tensors`) or masks it.

Shape legend: E logical experts, P physical slots, W ranks of the new group, S = P / W slots per
rank, D floats in one expert row (all of its tensors flattened).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..algorithms.rows import FetchPlan, fetch_plan
from ..core.communicator import Communicator
from ..moe.eplb import Placement, replicate
from ..moe.weights import fetch_rows

__all__ = ["plan_placement", "plan_sources", "plan_moves", "move_rows", "MISSING", "slots_for"]

MISSING = -1


def slots_for(num_logical: int, redundant: int, world: int) -> int:
    """Physical slot count for ``world`` ranks: the smallest multiple of ``world`` that holds
    every logical expert plus ``redundant`` replicas. Example: ``(16, 2, 3) -> 18``, ``(16, 2, 4)
    -> 20``."""
    need = num_logical + redundant
    return -(-need // world) * world


def plan_placement(load: torch.Tensor, held: Sequence[Sequence[int]], num_physical: int) -> Placement:
    """A placement over ``len(held)`` ranks that keeps experts where they are.

    ``load: [E]`` tokens per logical expert; ``held[r]``: logical experts rank r holds now (empty
    for a new rank). Replica counts follow EPLB (:func:`~flexep.moe.eplb.replicate`); each rank
    keeps its own experts, heaviest per replica first, while its slots and the expert's replica
    count allow; the remaining replicas go, heaviest first, to the least loaded rank with room
    that does not hold that expert yet.

    Example (E = 4, equal load, 2 slots per rank): ``held = [[0, 1], [2, 3], []]`` growing to 3
    ranks with P = 6 -> ranks keep ``[0, 1]`` and ``[2, 3]``; rank 2 gets replicas ``[0, 1]``.
    """
    world = len(held)
    if num_physical % world or num_physical < load.numel():
        raise ValueError(f"num_physical ({num_physical}) must be a multiple of the group size ({world}) "
                         f"and >= the number of experts ({load.numel()})")
    per_rank = num_physical // world
    load = load.detach().double().cpu()
    counts = replicate(load, num_physical).tolist()
    weight = [float(load[e]) / counts[e] for e in range(load.numel())]
    slots: list[list[int]] = [[] for _ in range(world)]
    busy = [0.0] * world
    for r, mine in enumerate(held):
        for e in sorted(set(mine), key=lambda e: (-weight[e], e)):
            if len(slots[r]) < per_rank and counts[e] > 0:
                slots[r].append(e)
                counts[e] -= 1
                busy[r] += weight[e]
    rest = [e for e in range(load.numel()) for _ in range(counts[e])]
    for e in sorted(rest, key=lambda e: (-weight[e], e)):
        room = [r for r in range(world) if len(slots[r]) < per_rank]
        fresh = [r for r in room if e not in slots[r]] or room
        r = min(fresh, key=lambda q: (busy[q], q))
        slots[r].append(e)
        busy[r] += weight[e]
    return Placement.from_physical_to_logical(torch.tensor(sum((sorted(s) for s in slots), [])),
                                              load.numel(), world)


def plan_sources(placement: Placement, held: Sequence[Optional[Sequence[int]]]) -> list[list[int]]:
    """``sources[r][j]``: the rank whose copy fills slot j of rank r, or :data:`MISSING`.

    A rank holding the expert serves itself; otherwise the holders take turns (so a replicated
    expert's copies share the sending). ``held[r]`` lists the *valid* experts of rank r (None or
    empty when it has none). Every rank computes the same plan from the same inputs.

    Example: slots ``[[0, 1], [2, 3]]``, held ``[[0, 1, 2], None]`` -> ``[[0, 0], [0, MISSING]]``.
    """
    world, per_rank = placement.num_ranks, placement.experts_per_rank
    wanted = placement.physical_to_logical.view(world, per_rank).tolist()
    holders: dict = {}
    for r, mine in enumerate(held):
        for e in set(mine or ()):
            holders.setdefault(e, []).append(r)
    turn: dict = {}
    sources = []
    for r in range(world):
        row = []
        for e in wanted[r]:
            if r in holders.get(e, ()):
                row.append(r)
            elif e in holders:
                k = turn.get(e, 0)
                turn[e] = k + 1
                row.append(holders[e][k % len(holders[e])])
            else:
                row.append(MISSING)
        sources.append(row)
    return sources


def plan_moves(owner: int, rank: int, wanted: Sequence[Sequence[int]], sources: Sequence[Sequence[int]],
               held: Sequence[int]) -> tuple[FetchPlan, list[int]]:
    """This rank's :class:`~flexep.algorithms.rows.FetchPlan` for filling its slots, built locally
    (every rank knows every rank's slots and sources), and the slots it fills.

    ``wanted[r][j]``: logical expert of slot j of rank r; ``sources`` from :func:`plan_sources`;
    ``held``: the logical expert of each row this rank offers (its valid experts); ``owner``:
    the id of the communicator that will run it. A source sends each expert a destination asks
    of it once, in the order of the destination's slots; a slot it holds itself is a local copy.
    Missing slots are left out.

    Example (2 ranks, rank 1 needs expert 5 from rank 0 for both its slots): rank 0 sends one
    row, rank 1 expands it into slots ``[0, 1]``.
    """
    world = len(wanted)
    index = {e: i for i, e in reversed(list(enumerate(held)))}
    filled = [j for j, src in enumerate(sources[rank]) if src != MISSING]
    want = [wanted[rank][j] for j in filled]
    owners = [sources[rank][j] for j in filled]
    per_owner: list[list[int]] = [[] for _ in range(world)]
    for e, o in zip(want, owners):
        if o != rank and e not in per_owner[o]:
            per_owner[o].append(e)
    asked: list[list[int]] = [[] for _ in range(world)]
    for d in range(world):
        for e, src in zip(wanted[d], sources[d]):
            if src == rank and d != rank and e not in asked[d]:
                asked[d].append(e)
    return fetch_plan(owner, rank, index, per_owner, asked, want, owners, len(held)), filled


def move_rows(comm: Communicator, wanted: Sequence[Sequence[int]], sources: Sequence[Sequence[int]],
              held: Sequence[int], rows: torch.Tensor) -> dict:
    """Move expert rows to the slots that need them over ``comm`` (collective: one row exchange
    through :func:`flexep.moe.weights.fetch_rows`, even when nothing moves).

    ``rows: [len(held), D]``: this rank's valid experts, one row each (all its tensors
    flattened). Returns ``{slot j: row [D]}`` for this rank's slots that are not missing.
    """
    plan, filled = plan_moves(comm.uid, comm.rank, wanted, sources, held)
    got = fetch_rows(comm, rows, plan)
    return {j: got[k] for k, j in enumerate(filled)}
