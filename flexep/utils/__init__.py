"""Helpers DeepEP's tests and callers use: FP8 casts, a similarity metric, a bitwise hash.

``from flexep.utils import per_token_cast_to_fp8, per_token_cast_back`` mirrors DeepEP's test
utilities (``tests/utils.py``) so code written against them ports unchanged: the two FP8
helpers are :mod:`flexep.quant`'s (DeepEP's exact arithmetic, hidden padded to a multiple of
128, dequantised rows returned as BF16), and ``inplace_unique``, ``create_grouped_scores``,
``align_up``, ``bench`` and ``check_nvlink_connections`` are the same helpers, device-neutral.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

from .._dtypes import dense
from ..event import EventHandle, EventOverlap
from ..quant import pack_ue8m0, per_token_cast_back, per_token_cast_to_fp8, unpack_ue8m0

__all__ = ["EventHandle", "EventOverlap", "per_token_cast_to_fp8", "per_token_cast_back", "pack_ue8m0",
           "unpack_ue8m0", "calc_diff", "hash_tensor", "align_up", "inplace_unique",
           "create_grouped_scores", "bench", "check_nvlink_connections"]


def align_up(x: int, y: int) -> int:
    """``x`` rounded up to a multiple of ``y``."""
    return (x + y - 1) // y * y


def inplace_unique(x: torch.Tensor, num_slots: int) -> None:
    """DeepEP's per-row dedup, in place: each row of ``x [T, K]`` (ids in ``[0, num_slots)``,
    ``-1`` unused) becomes its distinct ids in descending order, padded with ``-1``."""
    if x.dim() != 2:
        raise ValueError(f"inplace_unique: x must be 2-D, got {list(x.shape)}")
    mask = x < 0
    x_padded = x.masked_fill(mask, num_slots)
    bin_count = torch.zeros((x.size(0), num_slots + 1), dtype=x.dtype, device=x.device)
    bin_count.scatter_add_(1, x_padded, torch.ones_like(x_padded))
    bin_count = bin_count[:, :num_slots]
    sorted_bin_count, sorted_bin_idx = torch.sort(bin_count, dim=-1, descending=True)
    sorted_bin_idx.masked_fill_(sorted_bin_count == 0, -1)
    sorted_bin_idx = torch.sort(sorted_bin_idx, descending=True, dim=-1).values
    x[:, :].fill_(-1)
    valid_len = min(num_slots, x.size(1))
    x[:, :valid_len] = sorted_bin_idx[:, :valid_len]


def create_grouped_scores(scores: torch.Tensor, group_idx: torch.Tensor, num_groups: int) -> torch.Tensor:
    """DeepEP's group-limited routing helper: ``scores [T, E]`` with every expert outside the
    groups in ``group_idx [T, G]`` zeroed (experts split into ``num_groups`` contiguous groups)."""
    num_tokens, num_experts = scores.shape
    scores = scores.view(num_tokens, num_groups, -1)
    mask = torch.zeros((num_tokens, num_groups), dtype=torch.bool, device=scores.device)
    mask = mask.scatter_(1, group_idx, True).unsqueeze(-1).expand_as(scores)
    return (scores * mask).view(num_tokens, num_experts)


def bench(fn: Callable[[], object], num_warmups: int = 50, num_tests: int = 50,
          post_fn: Optional[Callable[[], object]] = None) -> Tuple[float, float, float]:
    """DeepEP's timing loop: ``(avg, min, max)`` seconds over ``num_tests`` runs after warm-ups,
    the first timed run dropped. Uses CUDA events on CUDA, a wall clock (after a device
    synchronize, when there is one) elsewhere."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(num_warmups):
        fn()
    sync()
    times = []
    for _ in range(num_tests):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            if post_fn is not None:
                post_fn()
            sync()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
            if post_fn is not None:
                post_fn()
    kept = torch.tensor(times[1:] if len(times) > 1 else times, dtype=torch.float64)
    return float(kept.mean()), float(kept.min()), float(kept.max())


def check_nvlink_connections(group: dist.ProcessGroup) -> None:
    """DeepEP checks NVLink between PCIe GPUs here; flexep runs on any backend, so this only
    checks that ``group`` is a process group."""
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepEP's similarity loss: ``1 - 2 sum(xy) / sum(x^2 + y^2)`` after shifting both by +1.

    0 means identical; computed in float64.
    """
    x, y = x.double() + 1, y.double() + 1
    denominator = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denominator)


def hash_tensor(t: torch.Tensor) -> int:
    """Sum of the tensor's bytes read as int64-widened int32 words: equal hashes for equal bits."""
    flat = dense(t).view(torch.uint8).flatten()
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return int(flat.view(torch.int32).sum(dtype=torch.int64))
