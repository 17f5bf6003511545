"""Expert load-balancing transfers: owners' weights to redundant copies, copies' gradients back.

DeepEP V2.5's ``lb_prefetch_weights`` / ``lb_reduce_grads`` semantics, on the transport. The
EP group is cut into domains of P consecutive ranks (DeepEP's NVLink domain; the whole group
for flexep's EPLB replicas). Every rank owns ``L`` experts; inside a domain, expert
``o * L + j`` is local expert j of domain rank o. A ``redundancy_mapping [P, R]`` (identical on
the domain's ranks) says which expert each of the R redundant slots of each domain rank holds
(``-1``: empty).

* :func:`lb_prefetch`: slot c of domain rank r receives the bytes of its expert's rows from the
  owner (any number of payloads, each ``[L, ...]`` at the owner and ``[R, ...]`` at the holder,
  equal bytes per expert; trailing shapes may differ). Empty slots are not written.
* :func:`lb_reduce`: each owner adds, for every slot holding one of its experts, that slot's
  float32 row to the expert's row (in ascending (rank, slot) order); the slots are unchanged.

One ``all_to_all`` over the EP group per call (only pairs inside a domain carry rows), after
one control round in which the ranks agree on the shapes (and, when the domain is the whole
group, on the mapping itself). The mapping is read on the host once per call (it is small; a
placement decision made on the host anyway).

Example (P = 2, L = 2, R = 1): mapping ``[[2], [-1]]``: domain rank 0's slot 0 holds expert 2,
local expert 0 of domain rank 1, so prefetch sends rank 1's row 0 to rank 0, and reduce adds
rank 0's slot 0 to rank 1's row 0.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import torch

from .low_latency import as_words

__all__ = ["lb_prefetch", "lb_reduce", "plan_transfers"]


def plan_transfers(mapping: list, rank: int, domain_size: int, num_local: int) -> tuple[list, list]:
    """``(sends, recvs)`` of ``rank`` for a prefetch: ``sends[d]`` = local expert rows this rank
    sends to EP rank d, in d's slot order; ``recvs[o]`` = this rank's slots filled by EP rank o.
    (A reduce moves the same rows the other way.)"""
    base, me = rank - rank % domain_size, rank % domain_size
    world_sends: list = []
    recvs: list = []
    for peer in range(domain_size):
        world_sends.append([e - me * num_local for e in mapping[peer] if e >= 0 and e // num_local == me])
        recvs.append([c for c, e in enumerate(mapping[me]) if e >= 0 and e // num_local == peer])
    return _widen(world_sends, base), _widen(recvs, base)


def _widen(per_domain_rank: list, base: int) -> list:
    """Per domain rank -> per EP rank (other domains: empty); EP size from the caller's use."""
    return [[]] * base + per_domain_rank


def _agree(comm, op: str, error, mapping: list, domain_size: int, row_bytes: int, num_local: int) -> None:
    values = {}
    if error is None:
        values = dict(hidden=row_bytes, capacity=len(mapping[0]) if mapping else 0, num_tokens=num_local,
                      num_experts=num_local * comm.world)
        if domain_size == comm.world:  # one mapping for the whole group: it must be the same everywhere
            values["mode"] = zlib.crc32(repr(mapping).encode()) & 0x7FFFFFFF
    comm.barrier(op, error, **values)


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` viewed as ``[rows, bytes]`` words for row copies."""
    return as_words(t.reshape(rows, -1).view(torch.uint8))


def lb_prefetch(comm, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], mapping: torch.Tensor,
                domain_size: int, error=None) -> None:
    """Copy owners' expert rows into the redundant slots of ``mapping`` (collective over the EP group).

    ``dst[i]: [R, ...]`` (written in place), ``src[i]: [L, ...]``, contiguous, same bytes per row.
    ``error``: a local input error found by the caller, raised on every rank.
    """
    world, rank = comm.world, comm.rank
    table = mapping.tolist() if error is None else []
    num_local = src[0].size(0) if error is None else 0
    row_bytes = sum(s.numel() // max(1, s.size(0)) * s.element_size() for s in src) if error is None else 0
    _agree(comm, "lb_prefetch", error, table, domain_size, row_bytes, num_local)
    sends, recvs = plan_transfers(table, rank, domain_size, num_local)
    sends, recvs = _pad(sends, world), _pad(recvs, world)
    send_idx = torch.tensor(sum(sends, []), dtype=torch.int64, device=src[0].device)
    recv_idx = torch.tensor(sum(recvs, []), dtype=torch.int64, device=src[0].device)
    dst_rows = [_rows(d, d.size(0)) for d in dst]
    out_rows = [v.new_empty(recv_idx.numel(), v.size(1)) for v in dst_rows]
    ins = [_rows(s, num_local).index_select(0, send_idx) for s in src]
    comm.transport.fault_point("before_payload")
    comm.transport.all_to_all("payload", ins, out_rows, [len(s) for s in sends], [len(r) for r in recvs])
    for view, got in zip(dst_rows, out_rows):
        view.index_copy_(0, recv_idx, got)


def lb_reduce(comm, red: torch.Tensor, exp: torch.Tensor, mapping: torch.Tensor, domain_size: int,
              error=None) -> None:
    """Add every redundant slot's row ``red: [R, D] float32`` to its owner's ``exp: [L, D]``
    (in place; ``red`` unchanged; collective over the EP group)."""
    world, rank = comm.world, comm.rank
    table = mapping.tolist() if error is None else []
    num_local = exp.size(0) if error is None else 0
    row_bytes = exp.size(1) * exp.element_size() if error is None else 0
    _agree(comm, "lb_reduce", error, table, domain_size, row_bytes, num_local)
    # A reduce is a prefetch backwards: this rank sends the slots a prefetch would fill.
    fill, take = plan_transfers(table, rank, domain_size, num_local)
    fill, take = _pad(fill, world), _pad(take, world)
    send_idx = torch.tensor(sum(take, []), dtype=torch.int64, device=red.device)
    targets = torch.tensor(sum(fill, []), dtype=torch.int64, device=exp.device)
    got = exp.new_empty(targets.numel(), exp.size(1))
    comm.transport.fault_point("before_payload")
    comm.transport.all_to_all("payload", [red.index_select(0, send_idx)], [got], [len(t) for t in take],
                              [len(f) for f in fill])
    exp.index_add_(0, targets, got)


def _pad(per_rank: list, world: int) -> list:
    return per_rank + [[]] * (world - len(per_rank))
