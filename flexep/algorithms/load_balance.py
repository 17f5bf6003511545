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
placement decision made on the host anyway) and turned into the same fetch and reduce plans
:mod:`flexep.moe.weights` uses (:mod:`flexep.algorithms.rows`), built locally.

Example (P = 2, L = 2, R = 1): mapping ``[[2], [-1]]``: domain rank 0's slot 0 holds expert 2,
local expert 0 of domain rank 1, so prefetch sends rank 1's row 0 to rank 0, and reduce adds
rank 0's slot 0 to rank 1's row 0.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import torch

from .low_latency import as_words
from .rows import mapping_plans, run_fetch, run_reduce

__all__ = ["lb_prefetch", "lb_reduce"]


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
    table = mapping.tolist() if error is None else []
    num_local = src[0].size(0) if error is None else 0
    row_bytes = sum(s.numel() // max(1, s.size(0)) * s.element_size() for s in src) if error is None else 0
    _agree(comm, "lb_prefetch", error, table, domain_size, row_bytes, num_local)
    fetch, _, filled = mapping_plans(table, comm.rank, comm.world, domain_size, num_local, comm.uid)
    comm.transport.fault_point("before_payload")
    got = run_fetch(comm.transport, [_rows(s, num_local) for s in src], fetch)
    slots = torch.tensor(filled, dtype=torch.int64, device=src[0].device)
    for d, rows in zip(dst, got):
        _rows(d, d.size(0)).index_copy_(0, slots, rows)


def lb_reduce(comm, red: torch.Tensor, exp: torch.Tensor, mapping: torch.Tensor, domain_size: int,
              error=None) -> None:
    """Add every redundant slot's row ``red: [R, D] float32`` to its owner's ``exp: [L, D]``
    (in place, in ascending (rank, slot) order after the owner's own row, rounded once;
    ``red`` unchanged; collective over the EP group)."""
    table = mapping.tolist() if error is None else []
    num_local = exp.size(0) if error is None else 0
    row_bytes = exp.size(1) * exp.element_size() if error is None else 0
    _agree(comm, "lb_reduce", error, table, domain_size, row_bytes, num_local)
    _, reduce, filled = mapping_plans(table, comm.rank, comm.world, domain_size, num_local, comm.uid)
    comm.transport.fault_point("before_payload")
    slots = torch.tensor(filled, dtype=torch.int64, device=red.device)
    (summed,) = run_reduce(comm.transport, [exp], [red.index_select(0, slots)], reduce)
    exp.copy_(summed)
