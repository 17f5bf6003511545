"""Sync-free normal mode (DeepEP V2 ``do_cpu_sync=False``): static shapes, no host read.

Normal-mode dispatch reads the receive counts on the host once to size its outputs; that read
stops a CUDA graph capture. Here every shape depends only on host integers known before the
call (the group size W, the capacity Q = ``num_max_tokens_per_rank``, the rows ``blocks[s]``
each source sends, the row width), so the whole call is capturable:

Dispatch
--------
1. Each rank packs one wire row per token (data | FP8 scales | top-k ids as int32 | weights)
   and sends its ``blocks[me]`` rows (its T tokens, then padding rows whose ids are all -1) to
   *every* rank: one ``all_to_all`` with even, host-known splits.
2. A receiver keeps the rows with an expert of its own (the ids say so: no counts exchange) and
   places them at ``cumsum(kept) - 1``: grouped by source rank in rank order, source token
   order inside, exactly the order of the counted path. Outputs have ``W * Q`` rows; rows past
   the valid prefix are padding (zero data, ids -1, source -1). Per-source and per-expert counts
   stay on the device (:class:`~flexep.algorithms.contract.SyncFreeHandle`).

Combine
-------
The receiver returns, for every row it was sent, the caller's row at that token's position
(a zero row where it kept none), in the same even blocks; the source reduces in DeepEP V2's
slot order (:mod:`flexep.algorithms.slot_reduce`): block d, row t is rank d's return for token t.

Bytes: each rank sends ``W * blocks[me]`` rows each way (``blocks[me]`` is its token count T
when the control round ran, else Q), against the routing's minimum of one row per (token,
destination); the difference is the price of knowing no count on the host. Deduplication
still holds for the rows that count, and the expanded layout is made locally
(:mod:`flexep.algorithms.expand`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._dtypes import wire_view
from ..comm.transport import Transport
from .contract import (
    Combined,
    Dispatched,
    SyncFreeCachedRequest,
    SyncFreeCombineRequest,
    SyncFreeDispatchRequest,
    SyncFreeHandle,
)
from .low_latency import as_words
from .packing import pack_rows, unpack_rows
from .slot_reduce import owners, pick_weights, slot_reduce, slot_rows

__all__ = ["SyncFree", "wire_row_bytes_sync_free"]


def wire_row_bytes_sync_free(hidden: int, dtype: torch.dtype, num_scales: int, num_topk: int,
                             has_weights: bool) -> int:
    """Bytes of one sync-free dispatch wire row: data padded to 8 bytes, then scales (4-byte
    packs), int32 ids and float32 weights, padded to 8. Example (H = 256 bf16, K = 4, weights):
    512 + 16 + 16 = 544."""
    data = -(-hidden * torch.empty((), dtype=dtype).element_size() // 8) * 8
    meta = 4 * num_scales + 4 * num_topk + (4 * num_topk if has_weights else 0)
    return data + -(-meta // 8) * 8


def _segments(blocks: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(source, index)`` of every staged row: ``[sum(blocks)] int64`` each.
    Example: blocks ``[2, 1]`` -> sources ``[0, 0, 1]``, indices ``[0, 1, 0]``."""
    total = int(sum(blocks))
    src = torch.repeat_interleave(torch.arange(len(blocks), device=device),
                                  torch.tensor(list(blocks), device=device), output_size=total)
    starts = torch.tensor([0, *list(blocks)[:-1]], dtype=torch.int64, device=device).cumsum(0)
    return src, torch.arange(total, device=device) - starts[src]


class _Wire:
    """Packing of the per-token wire row: data | scales | ids | weights (see the module)."""

    def __init__(self, x: torch.Tensor, scales: Optional[torch.Tensor], ids: Optional[torch.Tensor],
                 weights: Optional[torch.Tensor]) -> None:
        self.data = wire_view(x)
        self.data_bytes = x.size(1) * x.element_size()
        self.data_padded = -(-self.data_bytes // 8) * 8
        meta = [p for p in (scales, ids, weights) if p is not None]
        self.specs = [(p.dtype, p.size(1)) for p in meta]
        self.meta = meta
        self.meta_bytes = sum(p.size(1) * p.element_size() for p in meta)
        self.nbytes = self.data_padded + -(-self.meta_bytes // 8) * 8
        self.ids_offset = self.data_padded + (scales.size(1) * 4 if scales is not None else 0)

    def pack(self, rows: int, num_ids: int) -> torch.Tensor:
        """``[rows, nbytes] uint8``: the T token rows, then padding rows (ids -1, zeros else)."""
        tokens = self.data.size(0)
        out = torch.zeros(rows, self.nbytes, dtype=torch.uint8, device=self.data.device)
        out[:tokens, :self.data_bytes] = self.data.contiguous().view(torch.uint8)
        if self.meta:
            end = self.data_padded + self.meta_bytes
            out[:tokens, self.data_padded:end] = pack_rows([p.contiguous() for p in self.meta])
        if num_ids:
            out[tokens:, self.ids_offset:self.ids_offset + 4 * num_ids] = 0xFF  # int32 -1
        return out

    def unpack_meta(self, recv: torch.Tensor) -> list:
        return unpack_rows(recv[:, self.data_padded:self.data_padded + self.meta_bytes], self.specs)


class SyncFree:
    """The sync-free algorithm over one EP group (see the module docstring)."""

    name = "sync_free"

    def __init__(self, tp: Transport, owner: int) -> None:
        self.tp, self.owner = tp, owner

    def _exchange(self, send_rows: torch.Tensor, blocks: Sequence[int]) -> torch.Tensor:
        """Send ``send_rows`` (``blocks[me]`` rows) to every rank; ``[sum(blocks), B]`` back."""
        tp = self.tp
        send = send_rows.repeat(tp.world, 1)
        recv = send_rows.new_empty(int(sum(blocks)), send_rows.size(1))
        tp.fault_point("before_payload")
        tp.all_to_all("payload", [send], [recv], [send_rows.size(0)] * tp.world, list(blocks))
        return recv

    def dispatch(self, req: SyncFreeDispatchRequest, blocks: Sequence[int]) -> Dispatched:
        tp, x, topk = self.tp, req.x, req.topk_idx
        world, me = tp.world, tp.rank
        num_local, k = req.num_experts // world, topk.size(1)
        rows_out, device = world * req.capacity, x.device
        wire = _Wire(x, req.scales, topk.to(torch.int32), req.topk_weights)
        recv = self._exchange(wire.pack(blocks[me], k), blocks)
        meta = wire.unpack_meta(recv)
        ids = meta[1 if req.scales is not None else 0].to(torch.int64)
        local = ids - me * num_local
        is_local = (ids >= 0) & (local >= 0) & (local < num_local)
        kept = is_local.any(1)
        pos = torch.where(kept, torch.cumsum(kept.to(torch.int64), 0) - 1, rows_out)
        src, idx = _segments(blocks, device)

        def place(rows: torch.Tensor, fill) -> torch.Tensor:
            out = torch.full((rows_out + 1, *rows.shape[1:]), fill, dtype=rows.dtype, device=device)
            out.index_copy_(0, pos, rows)
            return out[:rows_out]

        recv_x = torch.zeros(rows_out + 1, wire.data_bytes, dtype=torch.uint8, device=device)
        as_words(recv_x).index_copy_(0, pos, as_words(recv[:, :wire.data_bytes]))
        recv_x = recv_x[:rows_out].view(x.dtype)
        recv_scales = place(meta[0], 0) if req.scales is not None else None
        recv_idx = place(torch.where(is_local, local, -1), -1)
        recv_w = None
        if req.topk_weights is not None:
            recv_w = place(torch.where(is_local, meta[-1], 0.0), 0.0)
        recv_counts = torch.zeros(world, dtype=torch.int64, device=device)
        recv_counts.index_add_(0, src, kept.to(torch.int64))
        expert = torch.where(is_local, local, num_local).reshape(-1)
        expert_counts = torch.zeros(num_local + 1, dtype=torch.int64, device=device)
        expert_counts.index_add_(0, expert, torch.ones_like(expert))
        handle = SyncFreeHandle(
            topk_idx=topk, recv_pos=pos, recv_src_rank=place(src.to(torch.int32), -1),
            recv_src_idx=place(idx.to(torch.int32), -1), recv_counts=recv_counts,
            expert_counts=expert_counts[:num_local], blocks=tuple(int(b) for b in blocks),
            capacity=req.capacity, rank=me, num_experts=req.num_experts, owner=self.owner)
        return Dispatched(recv_x, recv_scales, recv_idx, recv_w, None, handle)

    def cached_dispatch(self, req: SyncFreeCachedRequest) -> Dispatched:
        """New rows along the handle's routing: same blocks, same output rows."""
        tp, h, x = self.tp, req.handle, req.x
        rows_out, device = h.num_rows, x.device
        wire = _Wire(x, req.scales, None, req.topk_weights)
        recv = self._exchange(wire.pack(h.blocks[tp.rank], 0), h.blocks)
        meta = wire.unpack_meta(recv)
        recv_x = torch.zeros(rows_out + 1, wire.data_bytes, dtype=torch.uint8, device=device)
        as_words(recv_x).index_copy_(0, h.recv_pos, as_words(recv[:, :wire.data_bytes]))
        outs = []
        for part in meta:
            out = torch.zeros(rows_out + 1, part.size(1), dtype=part.dtype, device=device)
            out.index_copy_(0, h.recv_pos, part)
            outs.append(out[:rows_out])
        scales = outs[0] if req.scales is not None else None
        weights = outs[-1] if req.topk_weights is not None else None
        return Dispatched(recv_x[:rows_out].view(x.dtype), scales, None, weights, None, h)

    def combine(self, req: SyncFreeCombineRequest) -> Combined:
        """Every staged row's return (its token's row here, zero where none), then the slot-order
        reduction at the source."""
        tp, h = self.tp, req.handle
        world, mine = tp.world, h.blocks[tp.rank]
        order = req.slot_order
        kept = h.recv_pos < h.num_rows
        pos = h.recv_pos.clamp(max=h.num_rows - 1)
        sends, backs = [], []
        for part in (req.x, req.topk_weights):
            if part is None:
                continue
            words = as_words(part).index_select(0, pos)
            out = words.masked_fill_(~kept.unsqueeze(1), 0).view(part.dtype)  # no stale rows on the wire
            back = part.new_empty(world * mine + 1, part.size(1))
            back[-1].zero_()
            sends.append(out)
            backs.append(back)
        tp.fault_point("before_payload")
        tp.all_to_all("payload", sends, [b[:-1] for b in backs], list(h.blocks), [mine] * world)
        back, back_w = backs[0], (backs[1] if req.topk_weights is not None else None)
        tokens = h.num_tokens
        rowmap = (torch.arange(world, device=req.x.device) * mine).unsqueeze(0) + \
            torch.arange(tokens, device=req.x.device).unsqueeze(1)
        owner = owners(order.topk_idx, order.num_experts // world)
        rows = slot_rows(rowmap, owner, world * mine)
        out = slot_reduce(back, rows, owner, order, world, req.bias)
        weights = pick_weights(back_w, rows, owner) if back_w is not None else None
        return Combined(out, weights)
