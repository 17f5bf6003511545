"""EPLB replicas that train as one expert: gradients reduced onto the primary, copies kept equal.

An EPLB :class:`~flexep.moe.eplb.Placement` may hold a hot logical expert in several physical
slots; tokens are split between them, so each copy's gradient sees only its share. Summing the
copies' gradients gives the gradient of the expert as if it were held once, and giving every
copy that sum keeps the copies identical through any optimizer step: training with replicas
then matches training without them (to float32 rounding: the sum is grouped differently).

The slot of an expert's first replica (``logical_to_physical[e, 0]``) is its *primary*; the
other slots are redundant copies. In DeepEP V2.5's load-balancing format
(:mod:`flexep.algorithms.load_balance`, the whole EP group one domain, L slots per rank) a
placement becomes ``mapping [W, R] int32``: column c of rank r names the primary slot
(``owner * L + local``) of the c-th redundant copy rank r holds, ``-1`` past its copies.

Example (W = 2, L = 2, ``physical_to_logical = [0, 1, 0, 2]``): slot 2 (rank 1, local 0) copies
expert 0, whose primary is slot 0: ``mapping = [[-1], [0]]``, rank 1's copies are local ``[0]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algorithms.load_balance import lb_prefetch, lb_reduce
from .eplb import Placement

__all__ = ["ReplicaMap", "replica_map", "sync_replica_grads", "sync_replica_weights"]


@dataclass(frozen=True)
class ReplicaMap:
    """Where a placement's redundant copies live.

    Attributes:
        mapping: ``[W, R] int32``, DeepEP V2.5's ``redundancy_mapping`` (primary slot per copy,
            ``-1`` padding); ``R`` is the most copies any rank holds (0 without replicas).
        copies: per rank, the local slot index of each of its copies (column order).
    """

    mapping: torch.Tensor
    copies: tuple

    @property
    def num_redundant(self) -> int:
        return self.mapping.size(1)


def replica_map(placement: Placement) -> ReplicaMap:
    """The redundant copies of ``placement`` (see the module docstring)."""
    local = placement.experts_per_rank
    p2l = placement.physical_to_logical.tolist()
    primary = placement.logical_to_physical[:, 0].tolist()
    copies, columns = [], []
    for rank in range(placement.num_ranks):
        mine = [(j, primary[p2l[rank * local + j]]) for j in range(local)
                if primary[p2l[rank * local + j]] != rank * local + j]
        copies.append(tuple(j for j, _ in mine))
        columns.append([p for _, p in mine])
    width = max((len(c) for c in columns), default=0)
    mapping = torch.full((placement.num_ranks, width), -1, dtype=torch.int32)
    for rank, cols in enumerate(columns):
        mapping[rank, :len(cols)] = torch.tensor(cols, dtype=torch.int32)
    return ReplicaMap(mapping, tuple(copies))


def _expert_rows(layer, grads: bool) -> tuple[list, torch.Tensor]:
    """``(parameters, [L, D] rows)``: the layer's expert tensors (or their gradients) side by side."""
    params = [p for _, p in layer.experts.named_parameters()]
    if grads and any(p.grad is None for p in params):
        raise ValueError("every expert parameter needs a gradient: run backward first")
    local = params[0].size(0)
    return params, torch.cat([(p.grad if grads else p.detach()).reshape(local, -1) for p in params], 1)


def _write_back(params: list, rows: torch.Tensor, grads: bool) -> None:
    offset = 0
    for p in params:
        width = p[0].numel()
        part = rows[:, offset:offset + width].reshape(p.shape)
        with torch.no_grad():
            (p.grad if grads else p).copy_(part)
        offset += width


def _sync(layer, grads: bool) -> None:
    comm, rank = layer.buffer.comm, layer.buffer.rank
    rmap = replica_map(layer.placement)
    if rmap.num_redundant == 0:
        return
    params, rows = _expert_rows(layer, grads)
    mine = torch.tensor(rmap.copies[rank], dtype=torch.int64, device=rows.device)
    redundant = rows.new_zeros(rmap.num_redundant, rows.size(1))
    redundant[:mine.numel()] = rows.index_select(0, mine)
    mapping = rmap.mapping.to(rows.device)
    if grads:  # the primaries collect every copy's share
        lb_reduce(comm, redundant, rows, mapping, comm.world)
    lb_prefetch(comm, [redundant], [rows], mapping, comm.world)  # the copies take the primary's rows
    rows.index_copy_(0, mine, redundant[:mine.numel()])
    _write_back(params, rows, grads)


def sync_replica_grads(layer) -> None:
    """Give every copy of an expert (and its primary) the sum of all copies' gradients.

    Collective over ``layer.buffer``'s group; call after backward, before the optimizer step.
    A no-op for placements without replicas.
    """
    _sync(layer, grads=True)


def sync_replica_weights(layer) -> None:
    """Copy every primary's weights into its redundant copies (collective), e.g. after loading
    a checkpoint or to remove drift."""
    _sync(layer, grads=False)
