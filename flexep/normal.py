"""Normal (high-throughput) dispatch and combine, flat algorithm.

Shape legend: T tokens here, H hidden, K top-k, W ranks, L local experts, S scale columns,
M tokens received here, C DeepEP channels (``num_sms / 2``, only shapes the handle).

Dispatch sends each token once to every rank holding at least one of its experts (per-rank
dedup): rows are gathered grouped by destination, one ``all_to_all`` moves token rows and one
moves their packed metadata (source index, top-k ids and weights, FP8 scales). Rows arrive
grouped by source rank in rank order, in source token order, exactly as DeepEP delivers them.

Combine is the adjoint: every rank returns its rows along the reverse split and each source
sums them per token, in rank order with float32 accumulation (so results are deterministic),
rounding once to the input dtype (:mod:`flexep.reduce`).

The header round (:mod:`flexep.protocol`) has already run when these functions are called and
provides the ``[W, W]`` count matrix; these functions only move data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ._dtypes import wire_view
from .layout import aligned_expert_counts, send_order, to_local_expert_ids
from .reduce import sum_blocks
from .transport import Transport
from .workspace import Workspace

__all__ = ["NormalHandle", "Staged", "DispatchResult", "stage", "dispatch", "cached_dispatch", "combine",
           "pack_rows", "unpack_rows"]


@dataclass(frozen=True)
class NormalHandle:
    """Everything combine and cached dispatch need; also answers DeepEP's tuple indexing.

    Tuple view (``handle[i]``), as DeepEP's intranode handle:

    0. ``rank_prefix_matrix [W, W] int32``: ``[i][j]`` = tokens ranks ``0..i`` send to rank j;
       on rank j, source i occupies rows ``[prefix[i-1][j], prefix[i][j])``.
    1. ``channel_prefix_matrix [W, C] int32``: per destination, inclusive prefix over channels of
       the tokens sent (channel c covers source tokens ``[c*ceil(T/C), (c+1)*ceil(T/C))``).
    2. ``recv_channel_prefix_matrix [W, C] int32``: per source, start row of each channel's
       tokens inside that source's block.
    3. ``recv_src_idx [M'] int32``: token index inside its source rank for every received row
       (M' = ``num_worst_tokens`` when that was used, padded with -1).
    4. ``is_token_in_rank [T, W] bool``.
    5. ``send_head [T, W] int32``: position of token t among the tokens sent to rank r, or -1.

    With more than one node the tuple view is DeepEP's 10-entry internode handle, see
    :mod:`flexep.hierarchical`; ``handle[-4]`` is then ``recv_gbl_rank_prefix_sum [W]``.
    """

    rank_prefix_matrix: torch.Tensor
    channel_prefix_matrix: torch.Tensor
    recv_channel_prefix_matrix: torch.Tensor
    recv_src_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_head: torch.Tensor
    send_order: torch.Tensor  # [sum(send_counts)] int64, tokens gathered for sending
    send_counts: tuple  # tokens sent to each rank
    recv_counts: tuple  # tokens received from each rank
    num_recv_tokens: int
    hidden: int
    buffer_uid: int
    hier: Optional[object] = field(default=None, compare=False)  # hierarchical routing state

    @property
    def num_tokens(self) -> int:
        return self.is_token_in_rank.size(0)

    @property
    def num_rows(self) -> int:
        """Rows of ``recv_x`` this handle describes (``num_worst_tokens`` when it was used)."""
        return self.recv_src_idx.size(0)

    def _as_tuple(self) -> tuple:
        if self.hier is not None:
            return self.hier.as_deepep_tuple(self)
        return (self.rank_prefix_matrix, self.channel_prefix_matrix, self.recv_channel_prefix_matrix,
                self.recv_src_idx, self.is_token_in_rank, self.send_head)

    def __getitem__(self, i):
        return self._as_tuple()[i]

    def __len__(self) -> int:
        return len(self._as_tuple())

    def __iter__(self):
        return iter(self._as_tuple())


@dataclass(frozen=True)
class Staged:
    """Rows and metadata of a dispatch's first exchange, built while the header is in flight."""

    order: torch.Tensor  # [N] int64, token of each sent row, grouped by destination
    x: torch.Tensor  # [N, H] wire dtype, the rows (a workspace view)
    meta: torch.Tensor  # [N, B] uint8, packed metadata (see pack_token_meta)
    specs: list


@dataclass(frozen=True)
class DispatchResult:
    recv_x: torch.Tensor
    recv_scales: Optional[torch.Tensor]
    recv_topk_idx: Optional[torch.Tensor]
    recv_topk_weights: Optional[torch.Tensor]
    num_recv_tokens_per_expert: Optional[list]
    handle: NormalHandle


# ---- row packing --------------------------------------------------------------------------
def pack_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate row-aligned tensors ``[R, ...]`` of any dtypes into one ``[R, B] uint8``."""
    rows = parts[0].size(0)
    # Explicit widths: reshape(rows, -1) is ambiguous when there are no rows.
    return torch.cat([wire_view(p.contiguous()).reshape(rows, math.prod(p.shape[1:])).view(torch.uint8)
                      for p in parts], 1)


def unpack_rows(buf: torch.Tensor, specs: Sequence[tuple]) -> list[torch.Tensor]:
    """Inverse of :func:`pack_rows`; ``specs`` lists ``(dtype, columns)`` per part."""
    out, col = [], 0
    for dtype, cols in specs:
        nbytes = cols * torch.empty((), dtype=dtype).element_size()
        # clone, not contiguous(): a fresh tensor has an aligned storage offset even for 0 rows.
        out.append(buf[:, col:col + nbytes].clone(memory_format=torch.contiguous_format).view(dtype))
        col += nbytes
    return out


def channel_prefix(is_token_in_rank: torch.Tensor, channels: int) -> torch.Tensor:
    """``[W, C] int32``: inclusive prefix over channels of tokens sent to each rank."""
    tokens, world = is_token_in_rank.shape
    chunk = max(1, -(-tokens // channels))
    padded = torch.zeros(chunk * channels, world, dtype=torch.int32)
    padded[:tokens] = is_token_in_rank.to(torch.int32)
    return padded.view(channels, chunk, world).sum(1).cumsum(0).t().contiguous().to(torch.int32)


def recv_channel_prefix(recv_src_idx: torch.Tensor, recv_counts: Sequence[int],
                         src_tokens: Sequence[int], channels: int) -> torch.Tensor:
    """``[W, C] int32``: start row of each source channel inside that source's block."""
    out = torch.zeros(len(recv_counts), channels, dtype=torch.int32)
    start = 0
    for s, n in enumerate(recv_counts):
        chunk = max(1, -(-int(src_tokens[s]) // channels))
        bounds = torch.arange(channels, dtype=torch.int32) * chunk
        out[s] = torch.searchsorted(recv_src_idx[start:start + n].contiguous(), bounds).to(torch.int32)
        start += n
    return out


def stage(tp: Transport, x: torch.Tensor, scales: Optional[torch.Tensor],
          topk_idx: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor],
          is_token_in_rank: torch.Tensor) -> Staged:
    """Gather the rows to send, grouped by destination (local work, overlapped with the header)."""
    order = send_order(is_token_in_rank)
    meta, specs = pack_token_meta(order, topk_idx, topk_weights, scales)
    return Staged(order, gather_rows(tp.workspace, "send_x", wire_view(x), order), meta, specs)


def dispatch(tp: Transport, staged: Staged, x: torch.Tensor, scales: Optional[torch.Tensor],
             topk_idx: Optional[torch.Tensor], is_token_in_rank: torch.Tensor, counts: torch.Tensor,
             src_tokens: Sequence[int], num_experts: int, num_worst_tokens: int,
             expert_alignment: int, num_tokens_per_expert: Optional[torch.Tensor], channels: int,
             buffer_uid: int) -> DispatchResult:
    """Flat dispatch of :func:`stage`'s rows; ``counts: [W, W]`` from the header round."""
    rank = tp.rank
    order, specs = staged.order, staged.specs
    send_counts = counts[rank].tolist()
    recv_counts = counts[:, rank].tolist()
    num_recv = sum(recv_counts)
    rows = max(num_recv, num_worst_tokens)

    meta_recv = staged.meta.new_empty(num_recv, staged.meta.size(1))
    recv_x = padded_rows(x, rows, num_recv)
    tp.fault_point("before_payload")
    tp.all_to_all("payload", [staged.x, staged.meta], [recv_x[:num_recv], meta_recv],
                  send_counts, recv_counts)

    recv = finish_receive(tp, unpack_rows(meta_recv, specs), rows, num_recv, topk_idx, scales,
                          num_experts, num_worst_tokens, expert_alignment, num_tokens_per_expert)
    handle = NormalHandle(
        rank_prefix_matrix=counts.to(torch.int32).cumsum(0, dtype=torch.int32),
        channel_prefix_matrix=channel_prefix(is_token_in_rank, channels),
        recv_channel_prefix_matrix=recv_channel_prefix(recv.src_idx, recv_counts, src_tokens, channels),
        recv_src_idx=recv.src_idx,
        is_token_in_rank=is_token_in_rank,
        send_head=position_in_group(is_token_in_rank),
        send_order=order,
        send_counts=tuple(send_counts),
        recv_counts=tuple(recv_counts),
        num_recv_tokens=num_recv,
        hidden=x.size(1),
        buffer_uid=buffer_uid,
    )
    return DispatchResult(recv_x, recv.scales, recv.topk_idx, recv.topk_weights, recv.counts, handle)


def padded_rows(like: torch.Tensor, rows: int, num_recv: int) -> torch.Tensor:
    """``[rows, H]`` like ``like``, rows from ``num_recv`` on zeroed (``num_worst_tokens`` padding)."""
    out = like.new_empty(rows, like.size(1))
    out[num_recv:].view(torch.uint8).zero_()
    return out


def position_in_group(mask: torch.Tensor) -> torch.Tensor:
    """``[T, G] bool -> [T, G] int32``: rank of row t among the rows selected in column g, or -1.

    DeepEP's ``send_head``. Example: ``[[1, 0], [1, 1], [0, 1]] -> [[0, -1], [1, 0], [-1, 1]]``.
    """
    before = torch.cumsum(mask.to(torch.int32), 0, dtype=torch.int32) - 1
    return torch.where(mask, before, -1).to(torch.int32)


def pack_token_meta(order: torch.Tensor, topk_idx: Optional[torch.Tensor],
                    topk_weights: Optional[torch.Tensor], scales: Optional[torch.Tensor],
                    extra: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list]:
    """Metadata of the tokens ``order`` selects, one packed ``uint8`` row each, and its specs.

    Fields, in order: source index (int32), then top-k ids and weights if given, then ``extra``
    (already in send order) if given, then scales if given. :func:`finish_receive` reads them.
    """
    parts, specs = [order.to(torch.int32).unsqueeze(1)], [(torch.int32, 1)]
    if topk_idx is not None:
        parts += [topk_idx.index_select(0, order), topk_weights.index_select(0, order)]
        specs += [(torch.int64, topk_idx.size(1)), (torch.float32, topk_idx.size(1))]
    if extra is not None:
        parts.append(extra)
        specs.append((extra.dtype, extra.size(1)))
    if scales is not None:
        parts.append(scales.index_select(0, order))
        specs.append((scales.dtype, scales.size(1)))
    return pack_rows(parts), specs


@dataclass(frozen=True)
class Received:
    """Per-row outputs of a dispatch, padded to ``rows`` (``num_worst_tokens`` when used)."""

    src_idx: torch.Tensor  # [rows] int32, -1 in padding
    topk_idx: Optional[torch.Tensor]  # [rows, K] int64 local ids, -1 elsewhere and in padding
    topk_weights: Optional[torch.Tensor]  # [rows, K] float32, 0 where topk_idx is -1
    scales: Optional[torch.Tensor]  # [rows, S], zeros in padding
    counts: Optional[list]  # aligned per-local-expert counts, [] with num_worst_tokens


def finish_receive(tp: Transport, fields: Sequence[torch.Tensor], rows: int, num_recv: int,
                   topk_idx: Optional[torch.Tensor], scales: Optional[torch.Tensor], num_experts: int,
                   num_worst_tokens: int, expert_alignment: int,
                   num_tokens_per_expert: Optional[torch.Tensor]) -> Received:
    """Turn the received metadata fields (in flat receive order) into DeepEP's outputs."""
    local = num_experts // tp.world
    src_idx = torch.full((rows,), -1, dtype=torch.int32)
    src_idx[:num_recv] = fields[0].view(-1)
    recv_idx = recv_w = recv_scales = per_expert = None
    if topk_idx is not None:
        local_idx = to_local_expert_ids(fields[1], tp.rank, local)
        recv_idx = torch.full((rows, topk_idx.size(1)), -1, dtype=torch.int64)
        recv_idx[:num_recv] = local_idx
        recv_w = torch.zeros(rows, topk_idx.size(1), dtype=torch.float32)
        recv_w[:num_recv] = torch.where(local_idx >= 0, fields[2], 0.0)
        per_expert = torch.bincount(local_idx[local_idx >= 0], minlength=local).tolist()
    elif num_worst_tokens == 0:
        per_expert = exchange_expert_counts(tp, num_tokens_per_expert, local)
    if scales is not None:
        recv_scales = torch.zeros(rows, scales.size(1), dtype=scales.dtype)
        recv_scales[:num_recv] = fields[-1]
    counts = [] if num_worst_tokens else aligned_expert_counts(per_expert, expert_alignment)
    return Received(src_idx, recv_idx, recv_w, recv_scales, counts)


def exchange_expert_counts(tp: Transport, num_tokens_per_expert: torch.Tensor, local: int) -> list:
    """Per-local-expert token counts summed over sources, when no ``topk_idx`` travels."""
    send = num_tokens_per_expert.to(torch.int64).view(tp.world, local)
    recv = torch.empty_like(send)
    tp.all_to_all("expert_counts", [send], [recv], [1] * tp.world, [1] * tp.world, payload=False)
    return recv.sum(0).tolist()


def cached_dispatch(tp: Transport, x: torch.Tensor, scales: Optional[torch.Tensor],
                    handle: NormalHandle) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Send ``x`` (and scales) along ``handle``'s routing; same rows, same order, no counts round."""
    rows = handle.num_rows
    num_recv = handle.num_recv_tokens
    recv_x = padded_rows(x, rows, num_recv)
    sends, recvs = [gather_rows(tp.workspace, "send_x", wire_view(x), handle.send_order)], [recv_x[:num_recv]]
    recv_scales = None
    if scales is not None:
        recv_scales = torch.zeros(rows, scales.size(1), dtype=scales.dtype)
        sends.append(scales.index_select(0, handle.send_order))
        recvs.append(recv_scales[:num_recv])
    tp.fault_point("before_payload")
    tp.all_to_all("payload", sends, recvs, handle.send_counts, handle.recv_counts)
    return recv_x, recv_scales


# ---- combine ------------------------------------------------------------------------------
def combine(tp: Transport, x: torch.Tensor, handle: NormalHandle,
            topk_weights: Optional[torch.Tensor], bias: Sequence[torch.Tensor]
            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Flat combine: ``out[t] = sum(bias) + sum over receiving ranks of their row for t``."""
    num_recv = handle.num_recv_tokens
    total_sent = sum(handle.send_counts)
    ws = tp.workspace
    back = ws.get("back_x", (total_sent, x.size(1)), x.dtype, x.device)
    sends, recvs = [x[:num_recv]], [back]
    w_back = None
    if topk_weights is not None:
        w_back = ws.get("back_w", (total_sent, topk_weights.size(1)), torch.float32, x.device)
        sends.append(topk_weights[:num_recv])
        recvs.append(w_back)
    tp.fault_point("before_payload")
    tp.all_to_all("payload", sends, recvs, handle.recv_counts, handle.send_counts)
    out = sum_blocks(back, handle.send_order, handle.send_counts, handle.num_tokens, bias, ws)
    combined_w = None
    if w_back is not None:
        combined_w = sum_blocks(w_back, handle.send_order, handle.send_counts, handle.num_tokens)
    return out, combined_w


def gather_rows(ws: Workspace, name: str, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` written into the workspace tensor ``name`` (see :mod:`flexep.workspace`)."""
    out = ws.get(name, (index.numel(), *t.shape[1:]), t.dtype, t.device)
    return torch.index_select(t, 0, index, out=out)
