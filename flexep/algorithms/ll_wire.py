"""Low-latency dispatch, local pieces: wire rows, packing and the fixed-capacity receive layout.

Everything here is tensor math with shapes that depend only on the call's arguments (never on
the routing), so it runs under ``torch.compile(fullgraph=True)`` and inside a CUDA graph. Shape
legend: :mod:`flexep.algorithms.contract`; here R = W * Q received rows, S' scale columns, B the
bytes of one wire row.

One wire row per (token, destination rank): data (e4m3, cast here once per token, or the input
dtype) | scales | source token index (int32) | top-k ids (int32) | optional 32-byte call header
| padding to 16 bytes. The header (:mod:`flexep.core.ll_agreement`) lets host-side ranks check
that they make the same call without a separate round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..quant import FP8_MAX, fp8_dtype, pack_ue8m0

__all__ = ["HEADER_BYTES", "WireRow", "rdma_size_hint", "send_index", "as_words", "aligned",
           "pack_dispatch", "DispatchOutputs", "expand_dispatch", "Alloc"]

HEADER_BYTES = 32
Alloc = Callable[[str, tuple, torch.dtype, torch.device], torch.Tensor]


def _fresh(name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    del name
    return torch.empty(shape, dtype=dtype, device=device)


def rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                   num_experts: int) -> int:
    """DeepEP's ``get_low_latency_rdma_size_hint`` formula, in bytes (``num_ranks`` unused).

    Example (Q=128, H=7168, E=256): dispatch message ``16 + max(2H, H + 4S) = 14352`` B, combine
    message ``4S + 2H = 14560`` B, send = recv = ``E*Q*14560``, signal 1024: total
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
    """Byte layout of one dispatch wire row: data | scales | source index | top-k ids | header.

    Example (H=256, K=2, FP8 with float32 scales): data 256 B, scales 8 B at offset 256, source
    index at 264, ids at 268..276, padded to B = 288; with the header it sits at 280..312 and
    B = 320.
    """

    data_bytes: int
    scale_bytes: int
    num_topk: int
    header: bool = False

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
    def header_offset(self) -> int:
        """Rounded up to 8 bytes (the header is four int64 words)."""
        return -(-self.ids_end // 8) * 8

    @property
    def nbytes(self) -> int:
        """Row size, padded to 16 bytes (as DeepEP's messages) so rows move as int64 words."""
        end = self.header_offset + HEADER_BYTES if self.header else self.ids_end
        return -(-end // 16) * 16

    @staticmethod
    def of(hidden: int, num_topk: int, dtype: torch.dtype, use_fp8: bool, use_ue8m0: bool,
           header: bool = False) -> WireRow:
        if not use_fp8:
            return WireRow(hidden * dtype.itemsize, 0, num_topk, header)
        return WireRow(hidden, hidden // 128 if use_ue8m0 else 4 * (hidden // 128), num_topk, header)

    def header_words(self, rows: torch.Tensor) -> torch.Tensor:
        """``[N, 4] int64`` view of the header field of wire rows ``rows: [N, B] uint8``."""
        return rows[:, self.header_offset:self.header_offset + HEADER_BYTES].view(torch.int64)


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
    """``[W*Q] int64``: the token each send row carries, ``T`` (a padding row) where none.

    Block d (rows ``[d*Q, (d+1)*Q)``) lists, in source order, the tokens with at least one
    expert on rank d, each once. Needs ``T <= Q``.

    Example (E=4, W=2 so L=2, Q=3): ``topk_idx = [[0, 3], [1, -1], [2, 3]]``: rank 0 holds
    experts 0, 1 (tokens 0, 1), rank 1 holds 2, 3 (tokens 0, 2): ``[0, 1, 3, 0, 2, 3]``.
    """
    num_tokens = topk_idx.size(0)
    local = num_experts // num_ranks
    dev = topk_idx.device
    # Ids outside [0, E) (only possible unchecked, validate=None on an accelerator) select nothing:
    # they land in the spare column, like -1, instead of indexing out of bounds on the device.
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    owner = torch.where(valid, torch.div(topk_idx, local, rounding_mode="floor"), num_ranks)
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


def _cast_fp8_into(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, round_scale: bool,
                   use_ue8m0: bool, alloc: Alloc) -> None:
    """:func:`flexep.quant.per_token_cast_to_fp8` of ``x: [T, H]`` written into ``q`` (e4m3 view)
    and ``scales`` (float32 or packed int32 view): the same operations, so the same bits, in one
    reused float32 scratch instead of four fresh tensors."""
    num_tokens, hidden = x.shape
    work = alloc("ll_cast", (num_tokens, hidden // 128, 128), torch.float32, x.device)
    work.copy_(x.view(num_tokens, hidden // 128, 128))
    amax = work.abs().amax(-1).clamp_min_(1e-4)
    if round_scale:
        scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
        work.div_(scale.unsqueeze(-1))
    else:
        scale = amax / FP8_MAX
        work.mul_((FP8_MAX / amax).unsqueeze(-1))
    work.clamp_(-FP8_MAX, FP8_MAX)
    q.copy_(work.view(num_tokens, hidden))
    scales.copy_(pack_ue8m0(scale) if use_ue8m0 else scale)


def pack_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, index: torch.Tensor, row: WireRow,
                  use_fp8: bool, round_scale: bool, use_ue8m0: bool,
                  header: Optional[torch.Tensor] = None, alloc: Alloc = _fresh,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Wire rows ``[R, B] uint8`` for ``x: [T, H]``, ``topk_idx: [T, K]``, ``index: [R]``.

    Each token's row is built once (FP8 cast written straight into it), then rows are gathered
    per destination. Index value ``T`` selects the padding row: source index and ids ``-1``
    (its data bytes are not read by anyone). ``header: [4] int64`` fills every row's header.
    """
    num_tokens = x.size(0)
    tokens = alloc("ll_token_rows", (num_tokens + 1, row.nbytes), torch.uint8, x.device)
    if num_tokens:
        data = tokens[:num_tokens, :row.data_bytes]
        if use_fp8:
            scale_dtype = torch.int32 if use_ue8m0 else torch.float32
            scales = tokens[:num_tokens, row.scale_offset:row.src_offset].view(scale_dtype)
            _cast_fp8_into(x, data.view(fp8_dtype()), scales, round_scale, use_ue8m0, alloc)
        else:
            data.view(x.dtype).copy_(x)
        meta = tokens[:num_tokens, row.src_offset:row.ids_end].view(torch.int32)
        meta[:, 0] = torch.arange(num_tokens, dtype=torch.int32, device=x.device)
        meta[:, 1:] = topk_idx
    tokens[num_tokens, row.src_offset:row.ids_end] = 0xFF  # int32 -1: source and ids
    if header is not None:
        row.header_words(tokens).copy_(header.expand(num_tokens + 1, -1))
    if out is None:
        out = alloc("ll_send", (index.size(0), row.nbytes), torch.uint8, x.device)
    torch.index_select(as_words(tokens), 0, index, out=as_words(out))
    return out


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
                 device: torch.device, alloc: Alloc = _fresh) -> DispatchOutputs:
        rows = num_ranks * capacity
        spare = num_local * rows + 1
        scales_store = None
        if use_fp8:
            cols = hidden // 512 if use_ue8m0 else hidden // 128
            sdtype = torch.int32 if use_ue8m0 else torch.float32
            scales_store = alloc("ll_recv_scales", (num_local + 1, cols, rows), sdtype, device)
        return DispatchOutputs(
            x_flat=alloc("ll_recv_x", (spare, row.data_bytes), torch.uint8, device),
            scales_store=scales_store,
            src_flat=alloc("ll_recv_src", (spare,), torch.int32, device),
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


def eager_host(t: torch.Tensor) -> bool:
    """Whether a data-dependent size is free for ``t``: a host tensor in plain eager execution.

    Not under ``torch.compile`` or a dispatch mode (``FakeTensorMode``, tracing, the tests'
    host-sync guard), which need the static shapes the accelerator path keeps.
    """
    return (t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode())


def expand_dispatch(recv: torch.Tensor, out: DispatchOutputs, row: WireRow, rank: int,
                    num_ranks: int) -> None:
    """Fill ``out`` from the received wire rows ``recv: [R, B] uint8`` (rank order, Q per source).

    Slot of (row i, local expert l) = number of earlier received rows that chose l. Example
    (W=2, Q=2, L=1): rows choose l = [yes, no | yes, yes] -> slots [0, -, 1, 2],
    ``recv_count = [3]``, layout_range = ``[(0 << 32) | 1, (1 << 32) | 2]``.

    Cost: the index math is over the ``R x K`` received (row, k) pairs; data moves only for the
    rows that arrived, once per local expert they chose (on the host only those pairs are
    copied; elsewhere, with static shapes, pairs that are not local all land on one spare row,
    which stays in cache). Slots past ``recv_count`` keep whatever they held;
    ``recv_src_info`` is ``-1`` there (a pass over ``L * R`` int32).
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
    slot = torch.where(is_local, flat.gather(1, col.clamp(max=num_local - 1)), spare)  # [R, K]
    out.recv_slot.copy_(slot)
    num_topk = slot.size(1)
    src = recv[:, row.src_offset:row.ids_offset].view(torch.int32)  # [R, 1]
    out.src_flat.fill_(-1)
    out.src_flat.scatter_(0, slot.view(-1), src.expand(rows, num_topk).reshape(-1))
    data, dst = as_words(recv[:, :row.data_bytes]), as_words(out.x_flat)
    scales = None
    if out.scales_store is not None:
        scales = recv[:, row.scale_offset:row.src_offset].view(out.scales_store.dtype)
    by_token = None if scales is None else out.scales_store.transpose(1, 2)  # [L + 1, R, S'], spare L
    if eager_host(recv):  # move only the local pairs' rows
        pair_row, pair_k = is_local.nonzero().unbind(1)
        flat = slot[pair_row, pair_k]
        dst.index_copy_(0, flat, data.index_select(0, pair_row))
        if scales is not None:
            by_token.index_put_((torch.div(flat, rows, rounding_mode="floor"), flat % rows),
                                scales.index_select(0, pair_row))
        return
    for k in range(num_topk):
        dst.index_copy_(0, slot[:, k], data)
    if scales is not None:
        flat = slot.view(-1)
        per_pair = scales.unsqueeze(1).expand(rows, num_topk, scales.size(1)).reshape(rows * num_topk, -1)
        by_token.index_put_((torch.div(flat, rows, rounding_mode="floor"), flat % rows), per_pair)
