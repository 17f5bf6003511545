"""Move expert rows between ranks: *fetch* rows from their owners, *reduce* rows onto their owners.

Two collective operations over a :class:`flexep.core.Communicator`, each in two steps: a
**plan** (host lists, built once per mapping with a few small host rounds) and an **exchange**
(one uneven all-to-all of the rows through the communicator's transport, so deadlines, failure
detection and byte accounting apply). A plan is reusable while the mapping stays the same, e.g.
DeepEP V2's ``redundancy_mapping`` across training steps.

* :func:`plan_fetch` + :func:`fetch_rows`: every rank names the global ids it wants and the rank
  holding each; owners send those rows; a requester receives ``[len(want), ...]`` in request
  order. A rank asking for an id it holds itself copies it locally; an id asked twice from one
  owner travels once. (Online EPLB moves expert weights with it; DeepEP V2's
  ``lb_prefetch_weights`` is a fetch of the redundant slots' experts.)
* :func:`plan_reduce` + :func:`reduce_rows`: every rank contributes rows for ids; each owner
  returns its own rows plus every contribution to them, accumulated in float32 (float64 for
  float64) in a fixed order — its own row, then contributions by source rank, then by position
  in the source's list — and rounded once, so the result is bitwise reproducible. (DeepEP V2's
  ``lb_reduce_grads`` is a reduce of the replicas' gradients.)

Rows are tensors ``[n, ...]`` (any trailing shape and dtype; a sequence of tensors with the same
``n`` travels together under one plan). They stay on their device; the plan is turned into
index tensors on that device, and nothing is read back to the host. Bytes on the wire are the
minimum: each (requester, id) once for a fetch, each contribution once for a reduce; the
communicator's ``last_traffic`` reports them next to that minimum.

Shape legend: W ranks; n rows this rank owns (``ids``); m requested (fetch) or contributed
(reduce) rows; ``...`` a tensor's trailing shape.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ..algorithms.rows import FetchPlan, ReducePlan, fetch_plan, reduce_plan, run_fetch, run_reduce
from ..comm.control import dtype_code
from ..core.communicator import Communicator
from ..errors import RemoteInputError

__all__ = ["FetchPlan", "ReducePlan", "plan_fetch", "fetch_rows", "plan_reduce", "reduce_rows"]

Rows = Union[torch.Tensor, Sequence[torch.Tensor]]


# ---- planning -------------------------------------------------------------------------------
def _int_list(name: str, values) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise TypeError(f"{name} must be host ints (a list or a CPU tensor), got a "
                            f"{values.device.type} tensor")
        values = values.tolist()
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}") from exc
    if any(isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must hold ints, not bools")
    return out


def _host_group(comm: Communicator):
    return comm.host_group if comm.host_group is not None else comm.group


def _requests(comm: Communicator, op: str, ids, want, owners, dedup: bool, want_name: str):
    """Check the arguments collectively, then tell every owner what is asked of it.

    Returns ``(index, per_owner, asked, want, owners)``: this rank's id -> first row; the ids
    this rank asks of each owner (its own entry empty); the ids each source asks of this rank;
    the parsed ``want`` and ``owners``.
    """
    world, rank = comm.world, comm.rank
    error: Optional[BaseException] = None
    index: dict = {}
    per_owner: list[list[int]] = [[] for _ in range(world)]
    try:
        ids, want, owners = _int_list("ids", ids), _int_list(want_name, want), _int_list("owners", owners)
        if len(owners) != len(want):
            raise ValueError(f"owners must name one rank per entry of {want_name}: got {len(owners)} "
                             f"owners for {len(want)} ids")
        bad = [o for o in owners if not 0 <= o < world]
        if bad:
            raise ValueError(f"owners must be ranks in [0, {world}), got {sorted(set(bad))}")
        for row, i in enumerate(ids):
            index.setdefault(i, row)
        mine = sorted({i for i, o in zip(want, owners) if o == rank and i not in index})
        if mine:
            raise ValueError(f"rank {rank} names itself as the owner of ids {mine} but its ids do not "
                             "hold them")
        for i, o in zip(want, owners):
            if o != rank and not (dedup and i in per_owner[o]):
                per_owner[o].append(i)
    except (TypeError, ValueError) as exc:
        error = exc
    comm.barrier("barrier", error=error)  # a bad argument on any rank raises on every rank
    tp = comm.transport
    tp.begin(op)
    group = _host_group(comm)
    ones = [1] * world
    counts = torch.tensor([[len(p)] for p in per_owner], dtype=torch.int64)
    got = torch.empty_like(counts)
    tp.all_to_all("plan_counts", [counts], [got], ones, ones, group=group, payload=False)
    recv_counts = got.flatten().tolist()
    send = torch.tensor(sum(per_owner, []), dtype=torch.int64)
    asked_flat = torch.empty(sum(recv_counts), dtype=torch.int64)
    tp.all_to_all("plan_ids", [send], [asked_flat], [len(p) for p in per_owner], recv_counts,
                  group=group, payload=False)
    asked, start = [], 0
    for n in recv_counts:
        asked.append(asked_flat[start:start + n].tolist())
        start += n
    missing = {s: sorted({i for i in a if i not in index}) for s, a in enumerate(asked)}
    missing = {s: m for s, m in missing.items() if m}
    verdict = tp.all_gather("plan_verdict", torch.tensor([int(bool(missing))]), group=group)
    failed = [r for r, f in enumerate(verdict.flatten().tolist()) if f]
    if missing:
        detail = "; ".join(f"rank {s} asked for {m}" for s, m in missing.items())
        raise ValueError(f"{op}: rank {rank} was named as the owner of ids it does not hold ({detail}); "
                         f"its ids are {sorted(index)}")
    if failed:
        raise RemoteInputError(f"rank(s) {failed} were named as owners of ids they do not hold; see the "
                               "ValueError raised there", op=op, phase="plan_verdict", seq=tp.seq,
                               ranks=failed)
    return index, per_owner, asked, want, owners


def plan_fetch(comm: Communicator, ids: Sequence[int], want: Sequence[int], owners: Sequence[int]
               ) -> FetchPlan:
    """Plan a fetch (collective: every rank of ``comm`` calls it; four small host rounds).

    Args:
        ids: n ints, the global id of each row this rank owns (a repeated id is served from its
            first row).
        want: m ints, the ids this rank asks for (repeats allowed).
        owners: m ranks, the owner of each wanted id (this rank itself for a local copy).

    Raises ``ValueError``/``TypeError`` naming the argument on the rank whose arguments are
    wrong, :class:`~flexep.errors.RemoteInputError` on the others (also when an owner does not
    hold an id asked of it).

    Example (W = 2, rank 0 owns ids [10, 11], rank 1 owns [20, 21]): rank 0 with ``want =
    [21, 10, 21], owners = [1, 0, 1]`` receives one row (21) from rank 1 and returns rows
    ``[21, 10, 21]``.
    """
    index, per_owner, asked, want, owners = _requests(comm, "plan_fetch", ids, want, owners, True, "want")
    return fetch_plan(comm.uid, comm.rank, index, per_owner, asked, want, owners, len(ids))


def plan_reduce(comm: Communicator, ids: Sequence[int], contrib_ids: Sequence[int],
                owners: Sequence[int]) -> ReducePlan:
    """Plan a reduce (collective; four small host rounds).

    Args:
        ids: n ints, the global id of each row this rank owns (a repeated id sums onto its
            first row).
        contrib_ids: m ints, the id each contributed row adds onto (repeats allowed: each row
            is added).
        owners: m ranks, the owner of each contributed id (this rank itself: summed locally).

    Errors as :func:`plan_fetch`.
    """
    index, _, asked, contrib_ids, owners = _requests(comm, "plan_reduce", ids, contrib_ids, owners,
                                                     False, "contrib_ids")
    return reduce_plan(comm.uid, comm.rank, index, asked, contrib_ids, owners, len(ids))


# ---- exchanging -----------------------------------------------------------------------------
def _tensors(name: str, rows: Rows, num_rows: int) -> tuple[list[torch.Tensor], bool]:
    single = isinstance(rows, torch.Tensor)
    tensors = [rows] if single else list(rows)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(f"{name} must be a tensor or a non-empty sequence of tensors")
    for k, t in enumerate(tensors):
        label = name if single else f"{name}[{k}]"
        if t.dim() < 1 or t.size(0) != num_rows:
            raise ValueError(f"{label} must have {num_rows} rows (the plan's), got shape {tuple(t.shape)}")
        if t.device != tensors[0].device:
            raise ValueError(f"{label} is on {t.device}, {name}[0] on {tensors[0].device}; rows travel "
                             "from one device")
    return tensors, single


def _row_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(math.prod(t.shape[1:]) * t.element_size() for t in tensors)


def _agree(comm: Communicator, error: Optional[BaseException], row_bytes: int, tensors: Sequence) -> None:
    """The row format must be equal on every rank (one control round with ``check_consistency``)."""
    if not comm.check_consistency:
        if error is not None:
            raise error
        return
    values = {} if error is not None else dict(hidden=row_bytes, num_topk=len(tensors),
                                               x_dtype=dtype_code(tensors[0].dtype))
    comm.barrier("barrier", error=error, **values)


def _check_plan(comm: Communicator, plan, kind: type) -> None:
    if not isinstance(plan, kind):
        raise TypeError(f"plan must be a {kind.__name__}, got {type(plan).__name__}")
    if plan.owner != comm.uid:
        raise ValueError("plan was made by another communicator; plan with the one that exchanges")


def _set_minimum(comm: Communicator, plan, row_bytes: int) -> None:
    """The minimum: each row asked of (fetch) or owed to (reduce) a peer, once."""
    topo, rank = comm.topology, comm.rank

    def minimum() -> dict:
        out = {"local": 0, "intra": 0, "inter": 0}
        for peer, n in enumerate(plan.send_counts):
            if peer != rank:
                out[topo.link_class(rank, peer)] += n * row_bytes
        return out
    comm.transport.stats.set_minimum(minimum)


def fetch_rows(comm: Communicator, rows: Rows, plan: FetchPlan) -> Rows:
    """Run a fetch: ``rows: [n, ...]`` (or a sequence of them) -> ``[m, ...]`` in request order.

    Collective over ``comm``; one all-to-all of the rows (plus one agreement round on the row
    format when the communicator checks consistency). Returns new tensors of ``rows``' dtypes
    on their device; a tensor in, a tensor out; a sequence in, a list out.
    """
    error: Optional[BaseException] = None
    tensors: list[torch.Tensor] = []
    single = True
    try:
        _check_plan(comm, plan, FetchPlan)
        tensors, single = _tensors("rows", rows, plan.num_local)
    except (TypeError, ValueError) as exc:
        error = exc
    row_bytes = _row_bytes(tensors) if error is None else 0
    _agree(comm, error, row_bytes, tensors)
    tp = comm.transport
    tp.begin("fetch_rows")
    out = run_fetch(tp, tensors, plan)
    _set_minimum(comm, plan, row_bytes)
    return out[0] if single else out


def reduce_rows(comm: Communicator, rows: Rows, contrib: Rows, plan: ReducePlan) -> Rows:
    """Run a reduce: ``rows: [n, ...]`` plus every contribution to them -> ``[n, ...]``.

    ``contrib: [m, ...]`` (or a sequence matching ``rows``, each of its tensor's dtype and
    trailing shape). Sums in the accumulator dtype in the plan's fixed order and rounds once
    to ``rows``' dtype; ``rows`` is not modified (DeepEP's in-place form: ``rows.copy_(out)``).
    Collective over ``comm``, one all-to-all of the contributed rows owned elsewhere.
    """
    error: Optional[BaseException] = None
    tensors: list[torch.Tensor] = []
    parts: list[torch.Tensor] = []
    single = True
    try:
        _check_plan(comm, plan, ReducePlan)
        tensors, single = _tensors("rows", rows, plan.num_local)
        parts, _ = _tensors("contrib", contrib, plan.num_contrib)
        if len(parts) != len(tensors):
            raise ValueError(f"contrib must pair with rows: {len(parts)} tensors for {len(tensors)}")
        for k, (t, c) in enumerate(zip(tensors, parts)):
            if c.dtype != t.dtype or c.shape[1:] != t.shape[1:] or c.device != t.device:
                raise ValueError(f"contrib[{k}] must match rows[{k}] in dtype, trailing shape and "
                                 f"device: {c.dtype} {tuple(c.shape)} on {c.device} vs {t.dtype} "
                                 f"{tuple(t.shape)} on {t.device}")
            if not t.is_floating_point():
                raise TypeError(f"rows[{k}] must be floating point to be summed, got {t.dtype}")
    except (TypeError, ValueError) as exc:
        error = exc
    row_bytes = _row_bytes(parts) if error is None else 0
    _agree(comm, error, row_bytes, parts)
    tp = comm.transport
    tp.begin("reduce_rows")
    out = run_reduce(tp, tensors, parts, plan)
    _set_minimum(comm, plan, row_bytes)
    return out[0] if single else out
