"""Move rows between ranks by plan: *fetch* rows from their owners, *reduce* rows onto them.

The exchange half of two collective operations (their planning lives with their callers:
:mod:`flexep.moe.weights` plans from requested ids in a few host rounds; DeepEP V2's
load-balancing calls plan locally from a ``redundancy_mapping`` every rank holds):

* :func:`run_fetch`: owners send the rows a plan asks for; a requester gets ``[m, ...]`` in
  request order (ids it owns itself are copied locally, an id asked twice travels once);
* :func:`run_reduce`: contributions travel to their owners, who add them to their own rows in
  the accumulator dtype in the plan's fixed order (own row, then by source rank, then by
  position in the source's list) and round once: bitwise reproducible.

One uneven all-to-all of the rows through the transport each (deadlines, failure detection,
byte accounting); rows stay on their device, plans are host lists turned into index tensors.

Shape legend: W ranks; n rows this rank owns; m requested (fetch) or contributed (reduce) rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..comm.transport import Transport
from .reduce import accumulator_dtype

__all__ = ["FetchPlan", "ReducePlan", "fetch_plan", "reduce_plan", "mapping_plans", "run_fetch", "run_reduce"]


@dataclass(frozen=True)
class FetchPlan:
    """This rank's part of a fetch (host lists; see :func:`plan_fetch`).

    Attributes:
        owner: id of the communicator that planned it.
        num_local: n, rows this rank owns.
        send_rows: this rank's rows to send, grouped by destination rank.
        send_counts, recv_counts: ``[W]`` rows to / from each rank (0 for this rank).
        local_rows: this rank's rows that answer its own requests (each once).
        expand: ``[m]``: for each request, its row among (received rows, then ``local_rows``).
    """

    owner: int
    num_local: int
    send_rows: tuple
    send_counts: tuple
    recv_counts: tuple
    local_rows: tuple
    expand: tuple


@dataclass(frozen=True)
class ReducePlan:
    """This rank's part of a reduce (host lists; see :func:`plan_reduce`).

    Attributes:
        owner: id of the communicator that planned it.
        num_local: n, rows this rank owns.
        num_contrib: m, rows this rank contributes.
        send_rows: contributed rows owned elsewhere, grouped by owner, in list order.
        send_counts, recv_counts: ``[W]`` rows to / from each rank (0 for this rank).
        own_rows: contributed rows this rank owns itself, in list order.
        waves: the summation order as ``(incoming positions, target rows)`` pairs; wave k adds
            the k-th contribution of every target (incoming = each source's rows, by source
            rank, this rank's ``own_rows`` in its place), so no row is added twice in one wave.
    """

    owner: int
    num_local: int
    num_contrib: int
    send_rows: tuple
    send_counts: tuple
    recv_counts: tuple
    own_rows: tuple
    waves: tuple


def fetch_plan(owner: int, rank: int, index: dict, per_owner: Sequence[list], asked: Sequence[list],
               want: Sequence[int], owners: Sequence[int], num_local: int) -> FetchPlan:
    """The fetch plan of ``rank`` from its requests (``per_owner[o]``: ids this rank asks of o,
    in order, each once), what each source asks of it (``asked[s]``) and ``index`` (its id ->
    row)."""
    offsets = [0]
    for p in per_owner:
        offsets.append(offsets[-1] + len(p))
    local: list[int] = []
    expand = []
    for i, o in zip(want, owners):
        if o == rank:
            if index[i] not in local:
                local.append(index[i])
            expand.append(offsets[-1] + local.index(index[i]))
        else:
            expand.append(offsets[o] + per_owner[o].index(i))
    return FetchPlan(owner=owner, num_local=num_local, send_rows=tuple(index[i] for a in asked for i in a),
                     send_counts=tuple(len(a) for a in asked), recv_counts=tuple(len(p) for p in per_owner),
                     local_rows=tuple(local), expand=tuple(expand))


def reduce_plan(owner: int, rank: int, index: dict, asked: Sequence[list], contrib_ids: Sequence[int],
                owners: Sequence[int], num_local: int) -> ReducePlan:
    """The reduce plan of ``rank``: ``contrib_ids[j]`` (owned by ``owners[j]``) is what its j-th
    contributed row adds onto; ``asked[s]``: ids source s contributes to this rank, in order."""
    world = len(asked)
    send_rows: list[list[int]] = [[] for _ in range(world)]
    own = []
    for j, o in enumerate(owners):
        (own if o == rank else send_rows[o]).append(j)
    # Incoming rows in summation order: each source's block by source rank, this rank's own
    # contributions in its place; the target of each.
    targets = []
    for s in range(world):
        targets += [index[contrib_ids[j]] for j in own] if s == rank else [index[i] for i in asked[s]]
    seen: dict = {}
    waves: list[tuple[list, list]] = []
    for pos, t in enumerate(targets):
        k = seen.get(t, 0)
        seen[t] = k + 1
        if k == len(waves):
            waves.append(([], []))
        waves[k][0].append(pos)
        waves[k][1].append(t)
    return ReducePlan(owner=owner, num_local=num_local, num_contrib=len(contrib_ids),
                      send_rows=tuple(sum(send_rows, [])), send_counts=tuple(len(p) for p in send_rows),
                      recv_counts=tuple(len(a) for a in asked), own_rows=tuple(own),
                      waves=tuple((tuple(p), tuple(t)) for p, t in waves))


def mapping_plans(mapping: Sequence[Sequence[int]], rank: int, world: int, domain_size: int,
                  num_local: int, owner: int) -> tuple[FetchPlan, ReducePlan, list]:
    """Plans from DeepEP's ``redundancy_mapping [P, R]`` (identical on a domain's P ranks):
    slot c of domain rank r holds expert ``mapping[r][c]`` (``-1`` empty), owned by domain rank
    ``e // L`` as its local row ``e % L``. Returns ``(fetch, reduce, filled slots of this rank)``;
    no communication (every rank of the domain holds the mapping).

    Example (P = 2, L = 2): ``[[2], [-1]]``: rank 0's slot 0 fetches rank 1's row 0.
    """
    base, me = rank - rank % domain_size, rank % domain_size
    index = {base * num_local + me * num_local + j: j for j in range(num_local)}

    def owner_rank(e: int) -> int:
        return base + e // num_local

    filled = [c for c, e in enumerate(mapping[me]) if e >= 0]
    want = [base * num_local + mapping[me][c] for c in filled]
    owners = [owner_rank(mapping[me][c]) for c in filled]
    per_owner: list[list[int]] = [[] for _ in range(world)]
    for i, o in zip(want, owners):
        if o != rank and i not in per_owner[o]:
            per_owner[o].append(i)
    asked: list[list[int]] = [[] for _ in range(world)]
    for peer in range(domain_size):
        if base + peer == rank:
            continue
        for e in mapping[peer]:
            if e >= 0 and e // num_local == me:
                global_id = base * num_local + e
                if global_id not in asked[base + peer]:
                    asked[base + peer].append(global_id)
    fetch = fetch_plan(owner, rank, index, per_owner, asked, want, owners, num_local)
    contributions: list[list[int]] = [[] for _ in range(world)]  # reduce: every filled slot, in order
    for peer in range(domain_size):
        if base + peer != rank:
            contributions[base + peer] = [base * num_local + e for e in mapping[peer]
                                          if e >= 0 and e // num_local == me]
    reduce = reduce_plan(owner, rank, index, contributions, want, owners, num_local)
    return fetch, reduce, filled


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device)


def run_fetch(tp: Transport, tensors: Sequence[torch.Tensor], plan: FetchPlan) -> list[torch.Tensor]:
    """The exchange of a fetch: ``tensors[i]: [n, ...]`` -> ``[m, ...]`` in request order."""
    device = tensors[0].device
    send = _index(plan.send_rows, device)
    sends = [t.index_select(0, send) for t in tensors]
    recvs = [t.new_empty((sum(plan.recv_counts), *t.shape[1:])) for t in tensors]
    tp.all_to_all("rows", sends, recvs, plan.send_counts, plan.recv_counts)
    local, expand = _index(plan.local_rows, device), _index(plan.expand, device)
    return [torch.cat([r, t.index_select(0, local)]).index_select(0, expand) for r, t in zip(recvs, tensors)]


def run_reduce(tp: Transport, tensors: Sequence[torch.Tensor], parts: Sequence[torch.Tensor],
               plan: ReducePlan) -> list[torch.Tensor]:
    """The exchange of a reduce: ``tensors[i]: [n, ...]`` plus contributions ``parts[i]: [m, ...]``
    -> ``[n, ...]`` summed in the plan's order, rounded once."""
    device = tensors[0].device
    send, own = _index(plan.send_rows, device), _index(plan.own_rows, device)
    sends = [c.index_select(0, send) for c in parts]
    recvs = [c.new_empty((sum(plan.recv_counts), *c.shape[1:])) for c in parts]
    tp.all_to_all("rows", sends, recvs, plan.send_counts, plan.recv_counts)
    out = []
    for t, c, r in zip(tensors, parts, recvs):
        blocks = list(r.split(list(plan.recv_counts)))
        blocks[tp.rank] = c.index_select(0, own)
        incoming = torch.cat(blocks)
        acc = t.to(accumulator_dtype(t.dtype), copy=True)
        for positions, targets in plan.waves:
            rows = incoming.index_select(0, _index(positions, device)).to(acc.dtype)
            acc.index_add_(0, _index(targets, device), rows)
        out.append(acc.to(t.dtype))
    return out
