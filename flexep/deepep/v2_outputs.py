"""DeepEP V2's per-call outputs built from the core's results (local tensor math, no exchange).

Shape legend: :mod:`flexep.algorithms.contract`; R received rows (exact with CPU sync, W*T
without), T = ``num_max_tokens_per_rank`` of the call, S_u scale-up ranks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["src_metadata", "scaleup_psum", "expert_psums", "staging_slots", "tma_col_major", "split_x_v2",
           "unpack_bias"]


def src_metadata(src_rank: torch.Tensor, src_idx: torch.Tensor, local_idx: torch.Tensor, capacity: int,
                 slot_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """``recv_src_metadata [R, K + 2] int32`` (see :mod:`flexep.deepep.handle`).

    ``src_rank``/``src_idx: [R]`` (``-1`` in padding rows), ``local_idx: [R, K]`` local expert
    ids (``-1`` elsewhere), ``slot_rows: [R, K]`` expanded rows or None. Example (T = 8, K = 2):
    a row from rank 1, token 3, local ids ``[-1, 0]`` -> ``[11, 3, ...]``.
    """
    rows, k = local_idx.shape
    device = local_idx.device
    valid = src_rank >= 0
    src_rank, src_idx = src_rank.to(torch.int64), src_idx.to(torch.int64)
    slots = torch.arange(k, device=device).expand(rows, k)
    last = torch.where(local_idx >= 0, slots, -1).amax(1) if k else torch.full((rows,), -1, device=device)
    out = torch.full((rows, k + 2), -1, dtype=torch.int32, device=device)
    out[:, 0] = torch.where(valid, src_rank * capacity + src_idx, -1).to(torch.int32)
    out[:, 1] = torch.where(valid, src_rank * k + last, -1).to(torch.int32)
    if slot_rows is not None:
        out[:, 2:] = slot_rows.to(torch.int32)
    return out


def scaleup_psum(per_source: torch.Tensor, num_scaleup: int) -> torch.Tensor:
    """``[S_u] int32``: inclusive prefix sums of received tokens per source scale-up index
    (source rank r counts at ``r % S_u``). Example (S_u = 2): per source ``[1, 2, 3, 4]`` ->
    ``[4, 10]``."""
    grouped = per_source.to(torch.int64).view(-1, num_scaleup).sum(0)
    return torch.cumsum(grouped, 0).to(torch.int32)


def expert_psums(counts: torch.Tensor, alignment: int, ends: Optional[torch.Tensor]) -> torch.Tensor:
    """``psum_num_recv_tokens_per_expert [L] int32``: with ``ends`` (expanded) the end row of each
    expert's valid rows; else inclusive prefix sums of the aligned counts. Example (A = 4):
    counts ``[1, 5]`` -> ``[4, 12]`` (non-expanded), ends ``[1, 9]`` (expanded)."""
    if ends is not None:
        return ends.to(torch.int32)
    aligned = (counts.to(torch.int64) + alignment - 1) // alignment * alignment
    return torch.cumsum(aligned, 0).to(torch.int32)


def staging_slots(topk_idx: torch.Tensor, num_local: int, base: torch.Tensor, position: torch.Tensor
                  ) -> torch.Tensor:
    """``dst_buffer_slot_idx [N, K] int32``: ``base[d] + position[t, d]`` for the rank d owning
    slot k's expert, ``-1`` for unused slots (``base: [W]``, ``position: [N, W]``)."""
    owner = torch.where(topk_idx >= 0, torch.div(topk_idx.clamp(min=0), num_local, rounding_mode="floor"), 0)
    slot = base[owner] + position.gather(1, owner)
    return torch.where(topk_idx >= 0, slot, -1).to(torch.int32)


def tma_col_major(sf: torch.Tensor) -> torch.Tensor:
    """``sf: [R, P]`` in DeepEP's TMA layout: column-major, rows padded to 4 (strides
    ``(1, align(R, 4))``)."""
    rows, packs = sf.shape
    storage = torch.zeros(packs, -(-rows // 4) * 4, dtype=sf.dtype, device=sf.device)
    storage[:, :rows] = sf.t()
    return storage.t()[:rows]


def split_x_v2(x) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``x`` or ``(x_fp8, sf)`` -> ``(x, sf or None)``: the tuple form is the FP8 dispatch."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2 or not all(isinstance(p, torch.Tensor) for p in x):
            raise TypeError("x must be a tensor or an (x_fp8 [N, H], sf [N, P]) pair of tensors")
        return x[0], x[1]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor or an (x_fp8, sf) tuple, got {type(x).__name__}")
    return x, None


def unpack_bias(bias) -> tuple:
    """``None``, a tensor, or a tuple/list of up to two tensors (None entries skipped)."""
    if bias is None:
        return ()
    if isinstance(bias, torch.Tensor):
        return (bias,)
    if isinstance(bias, (tuple, list)) and len(bias) <= 2:
        parts: Sequence = [b for b in bias if b is not None]
        if all(isinstance(b, torch.Tensor) for b in parts):
            return tuple(parts)
    raise TypeError(f"bias must be None, a tensor or a tuple of up to two tensors, got {type(bias).__name__}")
