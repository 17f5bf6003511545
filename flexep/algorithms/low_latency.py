"""Low-latency (LL) dispatch and combine: fixed capacity, static shapes, no host sync.

DeepEP V1's low-latency kernels (decoding: few tokens per rank, lowest latency, CUDA graphs,
overlap with compute) written against :class:`~flexep.transport.Transport`. Every tensor shape
here depends only on the call's arguments, never on the routing, and nothing is read back to the
host, so on NCCL the whole path can be captured in a CUDA graph.

Shape legend: T tokens on this rank (``T <= M``), H hidden, K top-k, E experts, W ranks,
L = E / W local experts, M = ``num_max_dispatch_tokens_per_rank``, R = W * M receive rows,
S = H / 128 scale columns (S / 4 packed int32 words with UE8M0), B bytes of one wire row.

Dispatch: each token at most once per destination rank, M rows per (source, destination)
-----------------------------------------------------------------------------------------
1. :func:`send_index` packs, for every rank d, the tokens that chose an expert on d into rows
   ``[d*M, d*M + n_d)`` of a ``[R]`` index in source order; the rest of the block points at a
   padding row. ``T <= M`` means a block can never overflow, so nothing is ever dropped.
2. :func:`pack_dispatch` builds one uint8 wire row per token: data (e4m3, cast here once per
   token, or the input dtype), scales, the source token index and the top-k ids as int32. The
   padding row carries ids ``-1``, so it selects nothing.
3. one ``all_to_all`` with even splits: M rows to and from every peer.
4. :func:`expand_dispatch` gives every (received row, k) whose expert is local a slot. Slots are
   running counts over the received rows in (source rank, source token) order, so each source's
   tokens form one contiguous block per expert and blocks are packed from slot 0 in rank order
   (one valid "arrival order" in DeepEP's terms). Rows are scattered with ``index_copy_``;
   (row, k) pairs that are not local land on one spare row outside the output, so there are no
   masks to compact and no data-dependent shapes.

Combine: weights to the owners, one partial sum back per (token, rank)
----------------------------------------------------------------------
1. the source sends its ``topk_weights`` along the dispatch's send index (tiny round);
2. each owner sums, per received row, ``w[k] * x[expert_k, slot_k]`` over the k whose expert is
   local, in float32, and rounds once to ``x``'s dtype;
3. one ``all_to_all`` returns the M rows per pair to their sources;
4. the source adds the (at most W) partial rows of each token in float32 and rounds once.

The owner's partial sum is rounded to the wire dtype before the final sum, one rounding more than
DeepEP when a token picked several experts on the same rank (well inside BF16 tolerance).

Bytes per call (padding rows included: they are part of the static shape). Wire rows are padded
to 16 bytes, so they move as 64-bit words: FP8 ``B = align16(H + 4S + 4 + 4K)``, BF16
``B = align16(2H + 4 + 4K)``. Each rank sends M rows to every peer:

* dispatch ``(W-1) * M * B`` to peers (plus M rows copied to itself). For W=4, M=128, H=7168,
  K=8: B = 7440 (FP8) / 14384 (BF16), i.e. 2.86 MB / 5.52 MB per rank per call.
* combine ``(W-1) * M * (4K + 2H)``: 12 KB of weights + 5.51 MB of rows in the same example.

Sending per (token, expert) rows back instead (no weights round) needs ``M * min(K, L)`` rows of
capacity per pair: ``min(K, L)`` times the combine bytes (8x in the example), for one fewer tiny
round. DeepEP writes only the routed (token, expert) messages into a worst-case-sized RDMA
buffer; a collective with static splits moves the worst case (M rows per pair) on every call,
which is the price of having no host sync, and grows with W (normal mode moves only routed
tokens, see ``flexep bench``). The owner reduction likewise touches ``R * K`` (row, k) pairs.

Host syncs: no tensor value is read on the host (no ``.item()``, ``.tolist()``, ``nonzero``)
and no shape depends on data; the tests run the local pieces under
``torch.compile(fullgraph=True)`` and the whole call under a guard that fails on any such read.
The only host-side wait is the transport's deadline wait on the exchange.

Receive hooks: :func:`dispatch_send` / :func:`combine_send` allocate every output (static shapes),
launch the exchange and return a pending object; its ``finish()`` waits and fills the outputs in
place. Combine's send half waits on the tiny weights round before it launches the payload.

Double buffering: outputs are fresh tensors on every call (copy semantics), so any number of
results, and of un-finished hooks, may be held at once. DeepEP's limit of two does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch

from ..comm.transport import Exchange, Transport
from ..quant import fp8_dtype, per_token_cast_to_fp8
from .contract import LLCombineRequest, LLDispatchRequest, LowLatencyHandle

__all__ = ["LowLatency", "LowLatencyHandle", "WireRow", "rdma_size_hint", "send_index", "as_words",
           "aligned", "pack_dispatch", "expand_dispatch", "reduce_owner", "sum_partials", "DispatchOutputs",
           "PendingDispatch", "PendingCombine"]


def rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                   num_experts: int) -> int:
    """DeepEP's ``get_low_latency_rdma_size_hint`` formula, in bytes (``num_ranks`` unused).

    Example (M=128, H=7168, E=256): dispatch message ``16 + max(2H, H + 4S) = 14352`` B, combine
    message ``4S + 2H = 14560`` B, send = recv = ``E*M*14560``, signal 1024: total
    1,908,410,368 B, rounded up past the next multiple of 128 to 1,908,410,496.
    """
    del num_ranks  # DeepEP's formula does not use it
    t, h, e = num_max_dispatch_tokens_per_rank, hidden, num_experts
    scales = h // 128
    dispatch_msg = 16 + max(2 * h, h + 4 * scales)
    combine_msg = 4 * scales + 2 * h
    send = max(t * dispatch_msg, e * t * combine_msg)
    recv = max(e * t * dispatch_msg, e * t * combine_msg)
    signal = -(-4 * e // 128) * 128
    total = 2 * send + 2 * recv + 2 * signal
    return (total + 128) // 128 * 128


@dataclass(frozen=True)
class WireRow:
    """Byte layout of one dispatch wire row: data | scales | source index | top-k ids.

    Example (H=256, K=2, FP8 with float32 scales): data 256 B, scales 8 B at offset 256, source
    index at 264, ids at 268..276, padded to B = 288.
    """

    data_bytes: int
    scale_bytes: int
    num_topk: int

    @property
    def scale_offset(self) -> int:
        return self.data_bytes

    @property
    def src_offset(self) -> int:
        """After data and scales, rounded up to 4 bytes so the int32 fields stay aligned."""
        return -(-(self.data_bytes + self.scale_bytes) // 4) * 4

    @property
    def ids_offset(self) -> int:
        return self.src_offset + 4

    @property
    def ids_end(self) -> int:
        return self.ids_offset + 4 * self.num_topk

    @property
    def nbytes(self) -> int:
        """Row size, padded to 16 bytes (as DeepEP's messages) so rows move as int64 words."""
        return -(-self.ids_end // 16) * 16

    @staticmethod
    def of(hidden: int, num_topk: int, dtype: torch.dtype, use_fp8: bool, use_ue8m0: bool) -> WireRow:
        if not use_fp8:
            return WireRow(hidden * dtype.itemsize, 0, num_topk)
        return WireRow(hidden, hidden // 128 if use_ue8m0 else 4 * (hidden // 128), num_topk)


# ---- dispatch, local pieces (pure tensor math, static shapes) -----------------------------
def as_words(rows: torch.Tensor) -> torch.Tensor:
    """``rows: [N, C]`` (last dim contiguous) viewed as the widest integer words that divide a row.

    Row copies (``index_copy_``/``index_select``) cost per element on CPU, so moving a 7168-byte
    row as 896 int64 words instead of 7168 bytes is about 8x faster. Example: a ``[4, 6]``
    bfloat16 tensor (12-byte rows) becomes ``[4, 3] int32``. The first row must start at a
    16-byte aligned offset (fresh tensors and column slices at 0 do; see :func:`aligned`).
    """
    nbytes, stride = rows.size(1) * rows.element_size(), rows.stride(0) * rows.element_size()
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if nbytes % size == 0 and stride % size == 0:
            return rows.view(torch.uint8).view(dtype)
    return rows.view(torch.uint8)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a copy when its data does not start 16-byte aligned (a rare view)."""
    return t if t.storage_offset() * t.element_size() % 16 == 0 else t.clone()


def send_index(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, capacity: int) -> torch.Tensor:
    """``[W*M] int64``: the token each send row carries, ``T`` (a padding row) where none.

    Block d (rows ``[d*M, (d+1)*M)``) lists, in source order, the tokens with at least one
    expert on rank d, each once. Needs ``T <= M``.

    Example (E=4, W=2 so L=2, M=3): ``topk_idx = [[0, 3], [1, -1], [2, 3]]``: rank 0 holds
    experts 0, 1 (tokens 0, 1), rank 1 holds 2, 3 (tokens 0, 2): ``[0, 1, 3, 0, 2, 3]``.
    """
    num_tokens = topk_idx.size(0)
    local = num_experts // num_ranks
    dev = topk_idx.device
    owner = torch.where(topk_idx >= 0, torch.div(topk_idx, local, rounding_mode="floor"), num_ranks)
    # Unused slots hit a spare column that is dropped: no mask, no host sync.
    hit = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=dev)
    hit.scatter_(1, owner, True)
    hit = hit[:, :num_ranks]
    pos = hit.cumsum(0) - 1
    base = torch.arange(num_ranks, device=dev) * capacity
    spare = num_ranks * capacity
    target = torch.where(hit, base + pos, spare)
    out = torch.full((spare + 1,), num_tokens, dtype=torch.int64, device=dev)
    tokens = torch.arange(num_tokens, device=dev).unsqueeze(1).expand(num_tokens, num_ranks)
    out.scatter_(0, target.flatten(), tokens.flatten())
    return out[:spare]


def pack_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, index: torch.Tensor, row: WireRow,
                  use_fp8: bool, round_scale: bool, use_ue8m0: bool) -> torch.Tensor:
    """Wire rows ``[R, B] uint8`` for ``x: [T, H]``, ``topk_idx: [T, K]``, ``index: [R]``.

    FP8 cast (per token, per 128 channels, :mod:`flexep.quant`) happens here, once per token.
    Index value ``T`` selects a padding row: zero data, source index and ids ``-1``.
    """
    num_tokens = x.size(0)
    if use_fp8:
        q, scales = per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
        parts = [q.view(torch.uint8), scales]
    else:
        parts = [x]
    gap = row.src_offset - row.data_bytes - row.scale_bytes
    if gap:
        parts.append(torch.zeros(num_tokens, gap, dtype=torch.uint8, device=x.device))
    src = torch.arange(num_tokens, dtype=torch.int32, device=x.device).unsqueeze(1)
    tail = torch.zeros(num_tokens, row.nbytes - row.ids_end, dtype=torch.uint8, device=x.device)
    parts += [src, topk_idx.to(torch.int32), tail]
    rows = torch.cat([_row_bytes(p) for p in parts], 1)
    pad = torch.zeros(1, row.nbytes, dtype=torch.uint8, device=x.device)
    pad[:, row.src_offset:row.ids_end] = 0xFF  # int32 -1: source and ids
    return as_words(torch.cat([rows, pad])).index_select(0, index).view(torch.uint8)


def _row_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t: [T, C]`` as ``[T, C * itemsize] uint8``; empty tensors may carry strides that
    ``view`` rejects (e.g. FP8 scales of zero tokens), so they are rebuilt."""
    if t.numel() == 0:
        t = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return t.contiguous().view(torch.uint8)


@dataclass
class DispatchOutputs:
    """LL dispatch outputs, allocated before the exchange (static shapes), filled in place.

    ``x_flat: [L*R + 1, data_bytes] uint8`` and ``src_flat: [L*R + 1] int32`` end with one spare
    row that absorbs (row, k) pairs whose expert is not local; ``scales_store: [L + 1, S', R]``
    (token dimension contiguous, as DeepEP) has a spare expert for the same purpose.
    """

    x_flat: torch.Tensor
    scales_store: Optional[torch.Tensor]
    src_flat: torch.Tensor
    recv_count: torch.Tensor
    layout_range: torch.Tensor
    recv_slot: torch.Tensor
    x_dtype: torch.dtype
    hidden: int

    @staticmethod
    def allocate(num_local: int, num_ranks: int, capacity: int, num_topk: int, row: WireRow,
                 hidden: int, x_dtype: torch.dtype, use_fp8: bool, use_ue8m0: bool,
                 device: torch.device) -> DispatchOutputs:
        rows = num_ranks * capacity
        spare = num_local * rows + 1
        scales_store = None
        if use_fp8:
            cols = hidden // 512 if use_ue8m0 else hidden // 128
            sdtype = torch.int32 if use_ue8m0 else torch.float32
            scales_store = torch.empty(num_local + 1, cols, rows, dtype=sdtype, device=device)
        return DispatchOutputs(
            x_flat=torch.empty(spare, row.data_bytes, dtype=torch.uint8, device=device),
            scales_store=scales_store,
            src_flat=torch.empty(spare, dtype=torch.int32, device=device),
            recv_count=torch.empty(num_local, dtype=torch.int32, device=device),
            layout_range=torch.empty(num_local, num_ranks, dtype=torch.int64, device=device),
            recv_slot=torch.empty(rows, num_topk, dtype=torch.int64, device=device),
            x_dtype=fp8_dtype() if use_fp8 else x_dtype,
            hidden=hidden,
        )

    def recv_x(self) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """``recv_x: [L, R, H]`` (or the FP8 tuple with column-major scales ``[L, R, S']``)."""
        num_local = self.recv_count.size(0)
        rows = self.recv_slot.size(0)
        data = self.x_flat[:-1].view(self.x_dtype).view(num_local, rows, self.hidden)
        if self.scales_store is None:
            return data
        return data, self.scales_store[:num_local].transpose(1, 2)

    def recv_src_info(self) -> torch.Tensor:
        return self.src_flat[:-1].view(self.recv_count.size(0), -1)


def expand_dispatch(recv: torch.Tensor, out: DispatchOutputs, row: WireRow, rank: int,
                    num_ranks: int) -> None:
    """Fill ``out`` from the received wire rows ``recv: [R, B] uint8`` (rank order, M per source).

    Slot of (row i, local expert l) = number of earlier received rows that chose l. Example
    (W=2, M=2, L=1): rows choose l = [yes, no | yes, yes] -> slots [0, -, 1, 2],
    ``recv_count = [3]``, layout_range = ``[(0 << 32) | 1, (1 << 32) | 2]``.
    """
    rows, num_local = recv.size(0), out.recv_count.size(0)
    capacity = rows // num_ranks
    spare = num_local * rows
    ids = recv[:, row.ids_offset:row.ids_end].view(torch.int32).to(torch.int64)
    local = ids - rank * num_local
    is_local = (local >= 0) & (local < num_local)
    col = torch.where(is_local, local, num_local)
    chosen = torch.zeros(rows, num_local + 1, dtype=torch.int64, device=recv.device)
    chosen.scatter_(1, col, 1)
    chosen = chosen[:, :num_local]
    running = chosen.cumsum(0)  # [R, L] inclusive
    out.recv_count.copy_(running[-1])
    per_src = chosen.view(num_ranks, capacity, num_local).sum(1)  # [W, L]
    start = per_src.cumsum(0) - per_src
    out.layout_range.copy_(((start << 32) | per_src).t())

    flat = torch.arange(num_local, device=recv.device) * rows + running - 1  # [R, L]
    flat = torch.where(chosen.bool(), flat, spare)
    src = recv[:, row.src_offset:row.ids_offset].view(torch.int32)  # [R, 1]
    out.src_flat.fill_(-1)
    out.src_flat.scatter_(0, flat.flatten(), src.expand(rows, num_local).flatten())

    slot = torch.where(is_local, flat.gather(1, col.clamp(max=num_local - 1)), spare)  # [R, K]
    out.recv_slot.copy_(slot)
    data, dst = as_words(recv[:, :row.data_bytes]), as_words(out.x_flat)
    for k in range(slot.size(1)):
        dst.index_copy_(0, slot[:, k], data)
    if out.scales_store is not None:
        scales = recv[:, row.scale_offset:row.src_offset].view(out.scales_store.dtype)
        by_token = out.scales_store.transpose(1, 2)  # [L + 1, R, S'] view, spare expert L
        expert, within = torch.div(slot, rows, rounding_mode="floor"), slot % rows
        for k in range(slot.size(1)):
            by_token.index_put_((expert[:, k], within[:, k]), scales)


# ---- combine, local pieces ----------------------------------------------------------------
def reduce_owner(x: torch.Tensor, recv_slot: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Owner side: ``[R, H]`` partial sums ``sum_k w[i, k] * x[slot(i, k)]`` over local k.

    ``x: [L, R, H]`` expert outputs in dispatch slot layout, ``recv_slot: [R, K]`` (flat slots,
    ``L*R`` = not local), ``weights: [R, K] float32`` the sources' weights for those rows.
    Accumulates in float32 (k in order) and rounds once to ``x.dtype``. Rows of pairs that are
    not local are zeroed bitwise before use, so garbage (even NaN) in unused slots of ``x``
    never leaks in. Rows go through reused buffers in chunks (see :func:`_chunk_rows`).
    """
    num_local, rows, hidden = x.shape
    words = as_words(x.reshape(num_local * rows, hidden))
    spare = num_local * rows
    valid = recv_slot < spare
    idx = recv_slot.clamp(max=spare - 1)
    w = torch.where(valid, weights, 0.0)
    chunk = _chunk_rows(rows, hidden, x.device)
    # Rows of pairs that are not local are ANDed with 0 (all-ones keeps a valid row): a bitwise
    # zero is 0.0 in every float dtype, and this is ~4x faster on CPU than index_fill_/where.
    keep = torch.where(valid, -1, 0).to(words.dtype)
    picked = words.new_empty(chunk, words.size(1))
    wide = torch.empty(chunk, hidden, dtype=torch.float32, device=x.device)
    out = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    acc = torch.empty(chunk, hidden, dtype=torch.float32, device=x.device)
    for lo in range(0, rows, chunk):
        n = min(chunk, rows - lo)
        acc[:n].zero_()
        for k in range(recv_slot.size(1)):
            torch.index_select(words, 0, idx[lo:lo + n, k], out=picked[:n])
            picked[:n].bitwise_and_(keep[lo:lo + n, k:k + 1])
            wide[:n].copy_(picked[:n].view(x.dtype))
            acc[:n].addcmul_(wide[:n], w[lo:lo + n, k:k + 1])
        out[lo:lo + n].copy_(acc[:n])
    return out


def _chunk_rows(rows: int, hidden: int, device: torch.device) -> int:
    """Rows per step of :func:`reduce_owner`: about 2 MiB of float32 on CPU, where keeping the
    working set in cache is 2-3x faster; all rows at once elsewhere (fewer kernel launches).

    Example: hidden 7168 on CPU -> 73 rows per step; hidden 512 -> 1024 (capped at ``rows``).
    """
    if device.type != "cpu":
        return max(1, rows)
    return max(1, min(rows, (1 << 21) // (4 * hidden)))


def sum_partials(back: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Source side: ``[T, H] float32``, token t = sum of the returned rows that carry t.

    ``back: [R, H]`` rows in send order, ``index: [R]`` token of each row (T = padding, dropped).
    """
    acc = torch.zeros(num_tokens + 1, back.size(1), dtype=torch.float32, device=back.device)
    acc.index_add_(0, index, back.float())
    return acc[:num_tokens]


# ---- the algorithm ----------------------------------------------------------------------
class PendingDispatch:
    """Send half of an LL dispatch: outputs exist (unfilled) until :meth:`finish` runs."""

    def __init__(self, tp: Transport, exchange: Exchange, recv: torch.Tensor, out: DispatchOutputs,
                 row: WireRow, on_done: Optional[Callable[[DispatchOutputs], None]] = None) -> None:
        self._tp, self._exchange, self._recv, self.out, self._row = tp, exchange, recv, out, row
        self._on_done = on_done
        self.done = False

    def finish(self) -> None:
        """Wait for the exchange and fill the outputs (idempotent)."""
        if self.done:
            return
        self._tp.wait(self._exchange)
        expand_dispatch(self._recv, self.out, self._row, self._tp.rank, self._tp.world)
        self.done = True
        self._recv = None
        if self._on_done is not None:
            self._on_done(self.out)


class PendingCombine:
    """Send half of an LL combine: ``out`` is filled when :meth:`finish` runs."""

    def __init__(self, tp: Transport, exchange: Exchange, back: torch.Tensor, index: torch.Tensor,
                 out: torch.Tensor) -> None:
        self._tp, self._exchange, self._back, self._index, self.out = tp, exchange, back, index, out
        self.done = False

    def finish(self) -> None:
        """Wait for the partial sums and reduce them into ``out`` (idempotent)."""
        if self.done:
            return
        self._tp.wait(self._exchange)
        self.out.copy_(sum_partials(self._back, self._index, self.out.size(0)))
        self.done = True
        self._back = None


class LowLatency:
    """Fixed-capacity dispatch/combine over one EP group (see the module docstring)."""

    name = "low_latency"

    def __init__(self, tp: Transport, owner: int) -> None:
        self.tp, self.owner = tp, owner

    def dispatch(self, req: LLDispatchRequest) -> tuple[PendingDispatch, LowLatencyHandle]:
        """Pack, launch the exchange, allocate the outputs; the handle fills in on ``finish``."""
        tp = self.tp
        world, x, topk_idx, capacity = tp.world, req.x, req.topk_idx, req.capacity
        num_local = req.num_experts // world
        row = WireRow.of(x.size(1), topk_idx.size(1), x.dtype, req.use_fp8, req.use_ue8m0)
        index = send_index(topk_idx, req.num_experts, world, capacity)
        send = pack_dispatch(x, topk_idx, index, row, req.use_fp8, req.round_scale, req.use_ue8m0)
        recv = torch.empty_like(send)
        tp.fault_point("before_payload")
        even = [capacity] * world
        exchange = tp.start("ll_dispatch", [send], [recv], even, even)
        out = DispatchOutputs.allocate(num_local, world, capacity, topk_idx.size(1), row, x.size(1),
                                       x.dtype, req.use_fp8, req.use_ue8m0, x.device)
        stats = req.cumulative_local_expert_recv_stats
        on_done = None if stats is None else (lambda o: stats.add_(o.recv_count.to(stats.dtype)))
        pending = PendingDispatch(tp, exchange, recv, out, row, on_done)
        handle = LowLatencyHandle(
            recv_src_info=out.recv_src_info(), recv_layout_range=out.layout_range,
            num_max_dispatch_tokens_per_rank=capacity, hidden=x.size(1), num_experts=req.num_experts,
            send_index=index, recv_slot=out.recv_slot, topk_idx=topk_idx, num_ranks=world,
            owner=self.owner, pending=pending)
        return pending, handle

    def combine(self, req: LLCombineRequest) -> PendingCombine:
        """Weights round, owner reduction and launch of the return exchange."""
        tp, handle = self.tp, req.handle
        even = [handle.num_max_dispatch_tokens_per_rank] * tp.world
        w = req.topk_weights
        pad = w.new_zeros(1, w.size(1))
        w_send = torch.cat([w, pad]).index_select(0, handle.send_index)
        w_recv = torch.empty_like(w_send)
        tp.fault_point("before_weights")
        tp.all_to_all("ll_weights", [w_send], [w_recv], even, even)
        partial = reduce_owner(req.x, handle.recv_slot, w_recv)
        back = torch.empty_like(partial)
        tp.fault_point("before_payload")
        exchange = tp.start("ll_combine", [partial], [back], even, even)
        return PendingCombine(tp, exchange, back, handle.send_index, req.out)
