"""Online EPLB: re-place a serving layer's experts for the load it observed, moving weights rank
to rank through the communicator (no files, no restart).

:meth:`flexep.moe.MoELayer.rebalance` is the entry point:

1. the load is the layer's ``tokens_per_expert`` counters summed over the EP group (or one the
   caller passes; every rank must pass the same, checked);
2. :func:`flexep.eplb.rebalance` computes a placement for it, its ranks relabelled to keep
   as many experts where they are as possible; the layer moves only if the busiest rank's
   expected load drops (by ``min_improvement`` at least);
3. :func:`move_experts` copies each new slot's expert from this rank when it holds one, else
   from a replica on the same node, else from another rank, with one
   :func:`flexep.moe.weights.fetch_rows` of the three weight tensors (an expert crosses to a
   rank at most once). Serving continues with the new placement; outputs do not change
   (bitwise with ``slotwise_combine=True``, see :mod:`flexep.moe.layer`).

Shape legend: E logical experts, P physical slots, W ranks, L = P / W slots per rank.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from ..core.communicator import Communicator
from ..errors import RankMismatchError
from .eplb import Placement, rank_loads, rebalance
from .experts import GroupedExperts
from .weights import fetch_rows, plan_fetch

__all__ = ["Moved", "RebalanceReport", "sources", "move_experts", "rebalance_layer", "imbalance"]

_TENSORS = ("w_gate", "w_up", "w_down")


@dataclass(frozen=True)
class Moved:
    """What a placement change moved.

    Attributes:
        rows: expert copies that crossed from one rank to another, whole group.
        bytes: their bytes (three weight tensors each), whole group.
        sent_bytes: bytes this rank sent (its transport's accounting of the exchange).
    """

    rows: int
    bytes: int
    sent_bytes: int


@dataclass(frozen=True)
class RebalanceReport:
    """The outcome of :meth:`~flexep.moe.MoELayer.rebalance`.

    Attributes:
        placement: the placement in effect now.
        applied: whether the experts moved (False: the new placement was not better enough).
        load: ``[E] float64``, the load the placement was computed for.
        imbalance_before, imbalance_after: busiest rank over the mean under the old and the new
            placement, each expert's load split evenly over its replicas (1.0 for no load).
        moved: rows and bytes moved (zeros when not applied).
    """

    placement: Placement
    applied: bool
    load: torch.Tensor
    imbalance_before: float
    imbalance_after: float
    moved: Moved


@dataclass(frozen=True)
class _Result:
    experts: GroupedExperts
    report: Moved


def imbalance(load: torch.Tensor, placement: Placement) -> float:
    """Busiest rank's expected load over the mean (``load: [E]``); 1.0 when there is no load."""
    per_rank = rank_loads(load, placement)
    mean = float(per_rank.mean())
    return float(per_rank.max()) / mean if mean > 0 else 1.0


def sources(old: Placement, new: Placement, ranks_per_node: int, rank: int) -> list[int]:
    """The rank each of ``rank``'s new slots copies its expert from (``[L_new]`` ints).

    ``rank`` itself when it holds the expert under ``old``; else one of the expert's ranks on
    the same node, else one of all its ranks; among several, the ``rank % count``-th, which
    spreads the senders of a hot expert.

    Example (W = 2, one node each): old ``[0, 1 | 2, 3]``, new ``[0, 2 | 2, 0]`` -> rank 0:
    ``[0, 1]``, rank 1: ``[1, 0]``.
    """
    size_old, size_new = old.experts_per_rank, new.experts_per_rank
    holders: dict = {}
    for slot, e in enumerate(old.physical_to_logical.tolist()):
        holders.setdefault(e, [])
        if slot // size_old not in holders[e]:
            holders[e].append(slot // size_old)
    out = []
    for e in new.physical_to_logical[rank * size_new:(rank + 1) * size_new].tolist():
        near = [r for r in holders[e] if r // ranks_per_node == rank // ranks_per_node]
        pool = [rank] if rank in holders[e] else (near or holders[e])
        out.append(pool[rank % len(pool)])
    return out


def _moved_rows(old: Placement, new: Placement, ranks_per_node: int) -> int:
    """Expert copies crossing ranks over the whole group (each rank fetches an expert once)."""
    total = 0
    size = new.experts_per_rank
    for r in range(new.num_ranks):
        wanted = new.physical_to_logical[r * size:(r + 1) * size].tolist()
        total += len({e for e, s in zip(wanted, sources(old, new, ranks_per_node, r)) if s != r})
    return total


def agree(comm: Communicator, what: str, payload: bytes) -> None:
    """Raise :class:`~flexep.errors.RankMismatchError` on every rank unless every rank passed the
    same ``payload`` (one small host round comparing checksums)."""
    tp = comm.transport
    tp.begin(f"agree_{what}")
    group = comm.host_group if comm.host_group is not None else comm.group
    mine = torch.tensor([zlib.crc32(payload), len(payload)], dtype=torch.int64)
    rows = [tuple(r) for r in tp.all_gather(what, mine, group=group).tolist()]
    if len(set(rows)) > 1:
        odd = [r for r, v in enumerate(rows) if v != rows[0]]
        raise RankMismatchError(f"ranks passed different {what}s (rank(s) {odd} differ from rank 0); every "
                                f"rank must pass the same", op=tp.op, phase=what, seq=tp.seq, ranks=odd)


def move_experts(comm: Communicator, old: Placement, new: Placement, experts: GroupedExperts) -> _Result:
    """This rank's experts under ``new``, fetched from their holders under ``old`` (collective)."""
    agree(comm, "placement", bytes(str(new.physical_to_logical.tolist()), "ascii"))
    rank, per_node = comm.rank, comm.topology.ranks_per_node
    size_old, size_new = old.experts_per_rank, new.experts_per_rank
    have = old.physical_to_logical[rank * size_old:(rank + 1) * size_old].tolist()
    want = new.physical_to_logical[rank * size_new:(rank + 1) * size_new]
    plan = plan_fetch(comm, have, want.tolist(), sources(old, new, per_node, rank))
    tensors = [getattr(experts, t).detach() for t in _TENSORS]
    gate, up, down = fetch_rows(comm, tensors, plan)
    payload = comm.last_traffic.payload
    moved = GroupedExperts(want.to(gate.device), gate, up, down)
    for t in _TENSORS:
        getattr(moved, t).requires_grad_(getattr(experts, t).requires_grad)
    row_bytes = sum(math.prod(t.shape[1:]) * t.element_size() for t in tensors)
    rows = _moved_rows(old, new, per_node)
    return _Result(moved, Moved(rows=rows, bytes=rows * row_bytes,
                                sent_bytes=payload["intra"] + payload["inter"]))


def rebalance_layer(layer, load: torch.Tensor, *, num_physical: Optional[int], num_groups: Optional[int],
                    num_nodes: Optional[int], refine: bool, min_improvement: float) -> RebalanceReport:
    """:meth:`flexep.moe.MoELayer.rebalance` (see there)."""
    config, comm = layer.config, layer.buffer.comm
    if not isinstance(load, torch.Tensor) or load.shape != (config.num_experts,):
        got = tuple(load.shape) if isinstance(load, torch.Tensor) else type(load).__name__
        raise ValueError(f"load must be a [{config.num_experts}] tensor (one value per logical expert), "
                         f"got {got}")
    if not 0.0 <= float(min_improvement) < 1.0:
        raise ValueError(f"min_improvement must be in [0, 1), got {min_improvement}")
    load = load.detach().to("cpu", torch.float64)
    agree(comm, "load", bytes(str(load.tolist()), "ascii"))
    current = layer.placement
    new = rebalance(load, num_physical or current.num_physical, current.num_ranks,
                    num_groups or config.n_group, num_nodes or comm.topology.num_nodes, refine=refine,
                    current=current)
    before, after = imbalance(load, current), imbalance(load, new)
    if after < before * (1.0 - float(min_improvement)):
        return RebalanceReport(new, True, load, before, after, layer.apply_placement(new))
    return RebalanceReport(current, False, load, before, before, Moved(0, 0, 0))
