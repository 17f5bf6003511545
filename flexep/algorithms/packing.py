"""Row plumbing shared by the normal-mode algorithms: gather, pack, unpack, positions.

Every function keeps its outputs on its inputs' device and needs no host read: sizes that
depend on the routing are passed in as host integers (known from the control round).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .._dtypes import dense, wire_view
from ..comm.transport import Transport
from ..comm.workspace import Workspace

__all__ = ["exchange", "fuse_rows", "split_columns", "row_blocks", "rode_rows",
           "true_positions", "send_order", "pack_rows", "unpack_rows",
           "pack_token_meta", "gather_rows", "padded_rows", "position_in_group", "channel_prefix",
           "recv_channel_prefix", "segment_ids"]

# Below this many bytes sent by the busiest rank, the row tensors of one exchange travel packed
# in one message per peer: a collective round costs more than copying a few small rows twice.
FUSE_BYTES = 2 << 20


def fuse_rows(counts: torch.Tensor, row_bytes: int) -> bool:
    """Whether an exchange packs its tensors into one: decided from the routing's ``[W, W]`` host
    count matrix, which every rank holds, so every rank decides alike."""
    return int(counts.sum(1).max()) * row_bytes <= FUSE_BYTES if counts.numel() else True


def exchange(tp: Transport, phase: str, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor],
             send_counts: Sequence[int], recv_counts: Sequence[int], fuse: bool, **kw) -> None:
    """:meth:`Transport.all_to_all` of row-aligned tensor pairs, as one packed message per peer
    when ``fuse`` (and there are several tensors), else one exchange per tensor."""
    if not fuse or len(sends) == 1:
        tp.all_to_all(phase, sends, recvs, send_counts, recv_counts, **kw)
        return
    packed = pack_rows(sends)
    got = packed.new_empty(sum(recv_counts), packed.size(1))
    tp.all_to_all(phase, [packed], [got], send_counts, recv_counts, **kw)
    split_columns(got, recvs)


def split_columns(got: torch.Tensor, recvs: Sequence[torch.Tensor]) -> None:
    """Inverse of :func:`pack_rows` into existing tensors: ``got: [R, B] uint8`` column ranges
    copied into ``recvs`` (each ``[R, ...]``, contiguous: fresh or workspace rows)."""
    col = 0
    for r in recvs:
        width = math.prod(r.shape[1:]) * r.element_size()
        if r.numel():
            rows = wire_view(r).view(torch.uint8).view(r.size(0), width)
            rows.copy_(got[:, col:col + width])
        col += width


def row_blocks(packed: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
    """``packed: [sum(counts), B]`` rows grouped by destination -> one view per destination."""
    out, lo = [], 0
    for c in counts:
        out.append(packed[lo:lo + c])
        lo += c
    return out


def rode_rows(ride: torch.Tensor, counts: Sequence[int], own: torch.Tensor, rank: int) -> torch.Tensor:
    """The rows that rode in a control round (:class:`~flexep.comm.control.Header` ``ride``,
    ``[W, Z] uint8``), grouped by source: ``counts[s]`` rows of ``B`` bytes from source s, this
    rank's own block ``own: [counts[rank], B]`` in its place. Returns ``[sum(counts), B] uint8``."""
    width = own.size(1)
    got = own.new_empty(sum(counts), width)
    lo = 0
    for s, c in enumerate(counts):
        if c:
            got[lo:lo + c] = own if s == rank else ride[s, :c * width].view(c, width)
        lo += c
    return got


def true_positions(mask: torch.Tensor, total: int) -> torch.Tensor:
    """Ascending indices where the 1-D ``mask`` is True; ``total`` = their number (host int).

    ``nonzero`` would read the device to size its output; with the size known the positions
    are scattered into place instead. Example: ``[0, 1, 1, 0, 1]``, total 3 -> ``[1, 2, 4]``.
    """
    if mask.device.type == "cpu":
        return mask.nonzero().flatten()
    n = mask.numel()
    pos = torch.cumsum(mask, 0) - 1
    out = torch.empty(total + 1, dtype=torch.int64, device=mask.device)
    # Rows that are not selected all land on the spare slot ``total``, which is dropped.
    out.scatter_(0, torch.where(mask, pos, total), torch.arange(n, device=mask.device))
    return out[:total]


def send_order(mask: torch.Tensor, total: int) -> torch.Tensor:
    """Token indices grouped by destination column, ascending inside a column.

    ``mask: [T, G] bool`` -> ``[total] int64``. Example: ``[[1, 0], [1, 1], [0, 1]] -> [0, 1, 1, 2]``.
    """
    tokens = mask.size(0)
    flat = true_positions(mask.t().reshape(-1), total)
    return flat % tokens if tokens else flat


def segment_ids(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """``[sum(counts)] int64``: segment index of each row. Example: ``[2, 0, 1] -> [0, 0, 2]``."""
    total = int(sum(counts))
    return torch.repeat_interleave(torch.arange(len(counts), device=device),
                                   torch.tensor(list(counts), device=device), output_size=total)


def pack_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate row-aligned tensors ``[R, ...]`` of any dtypes into one ``[R, B] uint8``."""
    rows = parts[0].size(0)
    # Explicit widths: reshape(rows, -1) is ambiguous when there are no rows.
    return torch.cat([wire_view(dense(p)).reshape(rows, math.prod(p.shape[1:])).view(torch.uint8)
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


def pack_token_meta(order: torch.Tensor, topk_idx: Optional[torch.Tensor],
                    topk_weights: Optional[torch.Tensor], scales: Optional[torch.Tensor],
                    extra: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list]:
    """Metadata of the tokens ``order`` selects, one packed ``uint8`` row each, and its specs.

    Fields, in order: source index (int32), then top-k ids and weights if given, then ``extra``
    (already in send order) if given, then scales if given.
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


def gather_rows(ws: Workspace, name: str, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` written into the workspace tensor ``name`` (see :mod:`flexep.comm.workspace`)."""
    out = ws.get(name, (index.numel(), *t.shape[1:]), t.dtype, t.device)
    return torch.index_select(t, 0, index, out=out)


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


def channel_prefix(is_token_in_rank: torch.Tensor, channels: int) -> torch.Tensor:
    """``[W, C] int32``: inclusive prefix over DeepEP channels of tokens sent to each rank."""
    tokens, world = is_token_in_rank.shape
    chunk = max(1, -(-tokens // channels))
    padded = torch.zeros(chunk * channels, world, dtype=torch.int32, device=is_token_in_rank.device)
    padded[:tokens] = is_token_in_rank.to(torch.int32)
    return padded.view(channels, chunk, world).sum(1).cumsum(0).t().contiguous().to(torch.int32)


def recv_channel_prefix(recv_src_idx: torch.Tensor, recv_counts: Sequence[int],
                        src_tokens: Sequence[int], channels: int) -> torch.Tensor:
    """``[W, C] int32``: start row of each source channel inside that source's block.

    Row i of source s belongs to channel ``src_idx // ceil(T_s / C)``; the start of channel c is
    the number of the source's rows in earlier channels.
    """
    device = recv_src_idx.device
    world, num = len(recv_counts), int(sum(recv_counts))
    chunk = torch.tensor([max(1, -(-int(t) // channels)) for t in src_tokens], device=device)
    src = segment_ids(recv_counts, device)
    ch = torch.div(recv_src_idx[:num].to(torch.int64), chunk[src], rounding_mode="floor")
    hist = torch.zeros(world * channels, dtype=torch.int32, device=device)
    hist.index_add_(0, src * channels + ch, torch.ones(num, dtype=torch.int32, device=device))
    hist = hist.view(world, channels)
    return (torch.cumsum(hist, 1, dtype=torch.int32) - hist).contiguous()
