"""Flat normal-mode dispatch and combine: one exchange each way over the EP group.

Dispatch sends each token once to every rank holding at least one of its experts (per-rank
dedup): rows are gathered grouped by destination, one ``all_to_all`` moves token rows and one
moves their packed metadata (source index, top-k ids and weights, FP8 scales). Rows arrive
grouped by source rank in rank order, in source token order, exactly as DeepEP delivers them.

Combine is the adjoint: every rank returns its rows along the reverse split and each source
sums them per token, in rank order with float32 accumulation (so results are deterministic),
rounding once to the input dtype (:mod:`flexep.algorithms.reduce`).

Shape legend: :mod:`flexep.algorithms.contract`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .._dtypes import wire_view
from ..comm.control import Header
from ..comm.transport import Transport
from ..layout import to_local_expert_ids
from .contract import (
    CachedDispatchRequest,
    Combined,
    CombineRequest,
    Dispatched,
    DispatchRequest,
    NormalHandle,
    Sends,
)
from .packing import (
    exchange,
    fuse_rows,
    gather_rows,
    pack_rows,
    pack_token_meta,
    padded_rows,
    rode_rows,
    send_order,
    split_columns,
    unpack_rows,
)
from .reduce import sum_blocks

__all__ = ["Flat", "FlatRoute", "Received", "finish_receive"]


@dataclass(frozen=True)
class FlatRoute:
    """Replay state of a flat dispatch: ``order [sum(send_counts)] int64`` tokens gathered for
    sending, grouped by destination; the per-peer counts both ways."""

    order: torch.Tensor
    send_counts: tuple
    recv_counts: tuple


@dataclass(frozen=True)
class _Staged:
    order: torch.Tensor  # [R] int64, token of each sent row, grouped by destination
    x: torch.Tensor  # [R, H] wire dtype (a workspace view)
    meta: torch.Tensor  # [R, B] uint8, packed metadata
    specs: list


@dataclass(frozen=True)
class Received:
    """Per-row outputs of a dispatch, padded to ``rows`` (``num_worst_tokens`` when used)."""

    src_idx: torch.Tensor  # [rows] int32, -1 in padding
    topk_idx: Optional[torch.Tensor]  # [rows, K] int64 local ids, -1 elsewhere and in padding
    topk_weights: Optional[torch.Tensor]  # [rows, K] float32, 0 where topk_idx is -1
    scales: Optional[torch.Tensor]  # [rows, S], zeros in padding


def finish_receive(fields: Sequence[torch.Tensor], rows: int, num_recv: int, req: DispatchRequest,
                   rank: int, world: int) -> Received:
    """Turn received metadata fields (flat receive order) into DeepEP's per-row outputs."""
    device = req.device
    local = req.num_experts // world
    src_idx = torch.full((rows,), -1, dtype=torch.int32, device=device)
    src_idx[:num_recv] = fields[0].view(-1)
    recv_idx = recv_w = recv_scales = None
    if req.topk_idx is not None:
        k = req.topk_idx.size(1)
        local_idx = to_local_expert_ids(fields[1], rank, local)
        recv_idx = torch.full((rows, k), -1, dtype=torch.int64, device=device)
        recv_idx[:num_recv] = local_idx
        recv_w = torch.zeros(rows, k, dtype=torch.float32, device=device)
        recv_w[:num_recv] = torch.where(local_idx >= 0, fields[2], 0.0)
    if req.scales is not None:
        recv_scales = torch.zeros(rows, req.scales.size(1), dtype=req.scales.dtype, device=device)
        recv_scales[:num_recv] = fields[-1]
    return Received(src_idx, recv_idx, recv_w, recv_scales)


class Flat:
    """The flat algorithm over one EP group (see the module docstring)."""

    name = "flat"
    extra_width = 0

    def __init__(self, tp: Transport, owner: int) -> None:
        self.tp, self.owner = tp, owner

    def extra(self, req: DispatchRequest) -> Optional[torch.Tensor]:
        return None

    def stage(self, req: DispatchRequest, sends: Sends) -> _Staged:
        """Gather the rows to send, grouped by destination (overlaps the control round)."""
        order = send_order(req.is_token_in_rank, sum(sends.counts))
        meta, specs = pack_token_meta(order, req.topk_idx, req.topk_weights, req.scales)
        return _Staged(order, gather_rows(self.tp.workspace, "send_x", wire_view(req.x), order), meta, specs)

    @staticmethod
    def ride_rows(staged: _Staged) -> torch.Tensor:
        """``[R, B] uint8``: the staged rows and their metadata packed, to ride in the control
        round (:class:`~flexep.comm.control.Header` ``ride``)."""
        return pack_rows([staged.x, staged.meta])

    def dispatch(self, req: DispatchRequest, staged: _Staged, header: Header,
                 expert_counts: Optional[Sequence[int]], packed: Optional[torch.Tensor] = None) -> Dispatched:
        """Move the staged rows (unless they rode in the control round: ``header.ride``, with
        ``packed`` this rank's :meth:`ride_rows`) and build the outputs and the handle."""
        tp, rank = self.tp, self.tp.rank
        send_counts, recv_counts = header.counts[rank].tolist(), header.counts[:, rank].tolist()
        num_recv = sum(recv_counts)
        rows = max(num_recv, req.num_worst_tokens)
        meta_recv = staged.meta.new_empty(num_recv, staged.meta.size(1))
        recv_x = padded_rows(req.x, rows, num_recv)
        if header.ride is not None:
            own = packed[sum(send_counts[:rank]):sum(send_counts[:rank + 1])]
            split_columns(rode_rows(header.ride, recv_counts, own, rank), [recv_x[:num_recv], meta_recv])
        else:
            tp.fault_point("before_payload")
            exchange(tp, "payload", [staged.x, staged.meta], [recv_x[:num_recv], meta_recv], send_counts,
                     recv_counts, fuse_rows(header.counts, _row_bytes([req.x, staged.meta])))
        recv = finish_receive(unpack_rows(meta_recv, staged.specs), rows, num_recv, req, rank, tp.world)
        handle = NormalHandle(
            is_token_in_rank=req.is_token_in_rank, recv_src_idx=recv.src_idx, counts=header.counts,
            src_tokens=tuple(header.field("num_tokens")), rank=rank,
            handle_channels=req.handle_channels, num_recv_tokens=num_recv, hidden=req.x.size(1),
            owner=self.owner,
            route=FlatRoute(staged.order, tuple(send_counts), tuple(recv_counts)))
        return Dispatched(recv_x, recv.scales, recv.topk_idx, recv.topk_weights, expert_counts, handle)

    def cached_dispatch(self, req: CachedDispatchRequest) -> Dispatched:
        """Send ``x`` (and scales) along the handle's routing: same rows, same order."""
        tp, h = self.tp, req.handle
        route: FlatRoute = h.route
        rows, num_recv = h.num_rows, h.num_recv_tokens
        recv_x = padded_rows(req.x, rows, num_recv)
        sends = [gather_rows(tp.workspace, "send_x", wire_view(req.x), route.order)]
        recvs = [recv_x[:num_recv]]
        recv_scales = None
        if req.scales is not None:
            recv_scales = torch.zeros(rows, req.scales.size(1), dtype=req.scales.dtype, device=req.device)
            sends.append(req.scales.index_select(0, route.order))
            recvs.append(recv_scales[:num_recv])
        tp.fault_point("before_payload")
        exchange(tp, "payload", sends, recvs, route.send_counts, route.recv_counts,
                 fuse_rows(h.counts, _row_bytes(sends)))
        return Dispatched(recv_x, recv_scales, None, None, None, h)

    @staticmethod
    def combine_sends(req: CombineRequest) -> list:
        """The row tensors combine returns, each ``[num_recv, ...]``: ``x`` and the weights."""
        num_recv = req.handle.num_recv_tokens
        sends = [req.x[:num_recv]]
        if req.topk_weights is not None:
            sends.append(req.topk_weights[:num_recv])
        return sends

    def combine(self, req: CombineRequest, ride: Optional[torch.Tensor] = None,
                packed: Optional[torch.Tensor] = None) -> Combined:
        """``out[t] = sum(bias) + sum over receiving ranks of their row for t``.

        ``ride``: the rows that rode in the control round (``Header.ride``), with ``packed``
        this rank's :meth:`combine_sends` packed; None: they move in an exchange of their own.
        """
        tp, h = self.tp, req.handle
        route: FlatRoute = h.route
        total_sent = sum(route.send_counts)
        ws, x = tp.workspace, req.x
        back = ws.get("back_x", (total_sent, x.size(1)), x.dtype, x.device)
        sends, recvs = self.combine_sends(req), [back]
        w_back = None
        if req.topk_weights is not None:
            w_back = ws.get("back_w", (total_sent, req.topk_weights.size(1)), torch.float32, x.device)
            recvs.append(w_back)
        if ride is not None:
            rank = tp.rank
            own = packed[sum(route.recv_counts[:rank]):sum(route.recv_counts[:rank + 1])]
            split_columns(rode_rows(ride, route.send_counts, own, rank), recvs)
        else:
            tp.fault_point("before_payload")
            exchange(tp, "payload", sends, recvs, route.recv_counts, route.send_counts,
                     fuse_rows(h.counts, _row_bytes(sends)))
        out = sum_blocks(back, route.order, route.send_counts, h.num_tokens, req.bias, ws)
        combined_w = None
        if w_back is not None:
            combined_w = sum_blocks(w_back, route.order, route.send_counts, h.num_tokens)
        return Combined(out, combined_w)


def _row_bytes(tensors) -> int:
    """Bytes of one row across row-aligned tensors (each ``[R, ...]``)."""
    return sum(math.prod(t.shape[1:]) * wire_view(t).element_size() for t in tensors)
