"""Combine's reduction: sum rows that come back in blocks onto the tokens they belong to.

Rows return grouped in blocks (one per peer, or per forwarder in the hierarchical exchange);
inside a block tokens ascend and appear at most once. The result for token ``t`` is
``sum(bias)[t]`` plus ``t``'s rows in block order, accumulated in float32 (float64 for float64)
and rounded once, as DeepEP's combine does; the fixed order makes results bitwise reproducible.

The sum is one ``embedding_bag(mode="sum")`` pass: each token is a bag of row indices, bias
first, then its rows in block order. On the host a bag kernel reads each returned row once
(scattering with ``index_add_`` re-reads and re-writes a float32 accumulator once per block,
about 3x slower). Two host details shape the code:

* ``embedding_bag`` on bf16/fp16 weights accumulates in float32 but rounds ties away from zero
  on the host, where DeepEP and torch's casts round to even. Such rows are widened to float32
  tile by tile into a cache-sized scratch, summed there, and rounded by an ordinary cast.
* Tiles cover consecutive tokens, so each block contributes one contiguous row range per tile:
  a few range copies fill the scratch, or a single gather when a tile touches many blocks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..comm.workspace import Workspace

__all__ = ["sum_blocks", "accumulator_dtype"]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every float dtype narrower than float64 (DeepEP accumulates in float)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sum_blocks(rows: torch.Tensor, index: torch.Tensor, counts: Sequence[int], num_tokens: int,
               bias: Sequence[torch.Tensor] = (), ws: Optional[Workspace] = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[t] = sum(bias)[t] + sum of rows[i] with index[i] == t``, rounded once to rows' dtype.

    Args:
        rows: ``[R, D]`` float, grouped in blocks of ``counts`` rows.
        index: ``[R] int64`` token of each row; ascending inside a block, each token at most
            once per block.
        counts: rows per block, in block order (the summation order).
        num_tokens: ``T``.
        bias: ``[T, D]`` tensors of ``rows``' dtype, added first.
        ws: scratch for the host path (see :mod:`flexep.workspace`); None allocates.
        out: ``[T, D]`` of ``rows``' dtype to write into; None returns a fresh tensor.

    Returns:
        ``[T, D]`` of ``rows``' dtype (``out`` when given); zero for tokens without rows.
    """
    if num_tokens == 0 or rows.size(1) == 0:
        empty = torch.empty(num_tokens, rows.size(1), dtype=rows.dtype, device=rows.device)
        return empty if out is None else out
    acc = accumulator_dtype(rows.dtype)
    if rows.device.type == "cpu" and rows.numel() <= _SMALL:
        res = _sum_per_block(rows, index, counts, num_tokens, bias, acc)
        return res if out is None else out.copy_(res)
    bags, offsets = _bags(index, num_tokens, len(bias))
    if rows.device.type != "cpu" or rows.dtype == acc:
        res = _sum_direct(rows, bags, offsets, num_tokens, bias)
        return res if out is None else out.copy_(res)
    if out is None:
        out = torch.empty(num_tokens, rows.size(1), dtype=rows.dtype, device=rows.device)
    return _sum_tiled(rows, index, counts, bags, offsets, bias, acc, ws or Workspace(), out)


def _sum_per_block(rows: torch.Tensor, index: torch.Tensor, counts: Sequence[int], num_tokens: int,
                   bias: Sequence[torch.Tensor], acc: torch.dtype) -> torch.Tensor:
    """Small sums on the host: one scatter-add per block into a float32 accumulator.

    The same additions in the same order as the bag pass (bias, then each block in order; a
    token occurs at most once per block), so the result is bitwise the same; for a few rows
    this skips building the bags, which costs more than the sum.
    """
    total = torch.zeros(num_tokens, rows.size(1), dtype=acc)
    for b in bias:
        total += b.to(acc)
    start = 0
    for n in counts:
        if n:
            total.index_add_(0, index[start:start + n], rows[start:start + n].to(acc))
        start += n
    return total.to(rows.dtype)


def _bags(index: torch.Tensor, num_tokens: int, num_bias: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ``t``'s bag is ``bags[offsets[t]:offsets[t + 1]]``: ``nb`` bias placeholders
    (``-1 - b`` for bias ``b``), then the ids of its rows in block order. ``offsets: [T + 1]``.
    """
    device = index.device
    # A scatter-add of ones, not bincount: bincount's output size depends on the data.
    sizes = torch.full((num_tokens,), num_bias, dtype=torch.int64, device=device)
    sizes.index_add_(0, index, torch.ones_like(index))
    offsets = torch.zeros(num_tokens + 1, dtype=torch.int64, device=device)
    torch.cumsum(sizes, 0, out=offsets[1:])
    perm = torch.argsort(index, stable=True)  # rows grouped by token, block order inside
    bags = torch.empty(index.numel() + num_bias * num_tokens, dtype=torch.int64, device=device)
    # The q-th row in perm order (token t, j-th of t) sits after t's bias slots and the bags of
    # tokens before t, i.e. at q + nb * (t + 1).
    bags[torch.arange(perm.numel(), device=index.device) + num_bias * (index[perm] + 1)] = perm
    for b in range(num_bias):
        bags[offsets[:-1] + b] = -1 - b
    return bags, offsets


def _sum_direct(rows: torch.Tensor, bags: torch.Tensor, offsets: torch.Tensor, num_tokens: int,
                bias: Sequence[torch.Tensor]) -> torch.Tensor:
    """One bag pass over ``rows`` (with the bias rows appended); exact when no widening is due."""
    weight, ids = rows, bags
    if bias:
        weight = torch.cat([rows, *bias])
        # Placeholder -1 - b becomes row R + b*T + t of the concatenation.
        token = torch.repeat_interleave(torch.arange(num_tokens, device=bags.device),
                                        offsets[1:] - offsets[:-1], output_size=bags.numel())
        ids = torch.where(bags >= 0, bags, rows.size(0) + (-1 - bags) * num_tokens + token)
    return F.embedding_bag(ids, weight, offsets[:-1], mode="sum")


def _sum_tiled(rows: torch.Tensor, index: torch.Tensor, counts: Sequence[int], bags: torch.Tensor,
               offsets: torch.Tensor, bias: Sequence[torch.Tensor], acc: torch.dtype,
               ws: Workspace, out: torch.Tensor) -> torch.Tensor:
    """Host path for narrow dtypes: widen tile by tile into float32 scratch, sum, cast into ``out``."""
    num_tokens, width, nb, num_blocks = out.size(0), rows.size(1), len(bias), len(counts)
    per_token = max(1, -(-bags.numel() // num_tokens))
    step = max(1, min(num_tokens, _TILE_BYTES // max(1, per_token * width * 4)))
    num_tiles = -(-num_tokens // step)
    tile_len = torch.full((num_tiles,), step, dtype=torch.int64)
    tile_len[-1] = num_tokens - step * (num_tiles - 1)

    # Scratch of tile i: nb bias blocks of tile_len[i] rows, then the tile's rows by row id.
    block = torch.repeat_interleave(torch.arange(num_blocks), torch.tensor(list(counts), dtype=torch.int64))
    tile_of_row = torch.div(index, step, rounding_mode="floor")
    by_tile = torch.argsort(tile_of_row, stable=True)
    tile_rows = torch.bincount(tile_of_row, minlength=num_tiles)
    row_start = torch.cumsum(tile_rows, 0) - tile_rows
    t_sorted = tile_of_row[by_tile]
    local = torch.empty_like(index)
    local[by_tile] = torch.arange(index.numel()) - row_start[t_sorted] + nb * tile_len[t_sorted]
    is_row = bags >= 0
    ids = torch.zeros_like(bags)
    ids[is_row] = local[bags[is_row]]
    if nb:
        token = torch.repeat_interleave(torch.arange(num_tokens), offsets[1:] - offsets[:-1])
        ids = torch.where(is_row, ids, (-1 - bags) * tile_len[token // step] + token % step)

    # Each block's rows for tile i form one range: [first + earlier tiles' rows, + count).
    per_block = torch.bincount(tile_of_row * num_blocks + block, minlength=num_tiles * num_blocks)
    per_block = per_block.view(num_tiles, num_blocks)
    first = torch.cumsum(torch.tensor([0, *counts[:-1]], dtype=torch.int64), 0)
    lo = (first + torch.cumsum(per_block, 0) - per_block).tolist()
    cnt = per_block.tolist()
    busy = (per_block > 0).sum(1).tolist()
    starts, lens, offs = row_start.tolist(), tile_rows.tolist(), offsets.tolist()

    scratch = ws.get("reduce_tile", (nb * step + max(lens), width), acc, rows.device)
    for i in range(num_tiles):
        t0, t1 = i * step, min(num_tokens, (i + 1) * step)
        n = t1 - t0
        for b, bias_b in enumerate(bias):
            scratch[b * n:(b + 1) * n].copy_(bias_b[t0:t1])
        k = nb * n
        if busy[i] > _GATHER_BLOCKS:
            picked = ws.get("reduce_gather", (lens[i], width), rows.dtype, rows.device)
            torch.index_select(rows, 0, by_tile[starts[i]:starts[i] + lens[i]], out=picked)
            scratch[k:k + lens[i]].copy_(picked)
            k += lens[i]
        else:
            for p in range(num_blocks):
                c = cnt[i][p]
                if c:
                    scratch[k:k + c].copy_(rows[lo[i][p]:lo[i][p] + c])
                    k += c
        a, b_ = offs[t0], offs[t1]
        res = F.embedding_bag(ids[a:b_], scratch[:k], offsets[t0:t1] - a, mode="sum")
        out[t0:t1].copy_(res)
    return out


# Host sums of at most this many values take the per-block scatter-add path (fixed cost first).
_SMALL = 1 << 16
# About 4 MiB of float32 scratch per tile: in cache, and large enough that per-tile Python
# overhead stays small (measured optimum 2-8 MiB for hidden 7168).
_TILE_BYTES = 4 << 20
# A tile touching more blocks than this is filled by one gather instead of per-block copies.
_GATHER_BLOCKS = 16
