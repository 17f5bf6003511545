"""DeepEP V2's module-level helpers: buffer-size hint, domain sizes, alignments, SM/QP hints.

flexep allocates per call, so none of these numbers sizes memory here; they are returned as
DeepEP computes them because callers compare them (torchtitan rebuilds its buffer when
``buffer.num_bytes < get_buffer_size_hint(...)``) and DeepEP checks each call against the
buffer's size. Physical domains: a node of flexep's topology is DeepEP's NVLink (LSA) domain;
a bare process group is sized from ``FLEXEP_RANKS_PER_NODE`` or torchrun's
``LOCAL_WORLD_SIZE`` (no collective), else one domain of the whole group.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch.distributed as dist

__all__ = ["get_num_allocation_alignment", "get_num_tma_alignment", "get_num_rdma_alignment",
           "calculate_buffer_size", "dispatch_buffer_size", "combine_buffer_size", "get_buffer_size_hint",
           "get_physical_domain_size", "get_logical_domain_size", "theoretical_num_sms",
           "theoretical_num_qps",
           "lb_theoretical_num_sms"]

ALLOCATION_ALIGNMENT = 2 << 20  # 2 MiB: DeepEP's buffer granularity
TMA_ALIGNMENT = 32
RDMA_ALIGNMENT = 64
_HYBRID_CHANNELS = 1280  # DeepEP's forwarding channels (8 per SM x 160 SMs), a term of its formula


def get_num_allocation_alignment() -> int:
    """Bytes every buffer size is a multiple of (2 MiB)."""
    return ALLOCATION_ALIGNMENT


def get_num_tma_alignment() -> int:
    """Byte multiple of load-balancing payload rows (32)."""
    return TMA_ALIGNMENT


def get_num_rdma_alignment() -> int:
    """DeepEP's RDMA alignment (64 bytes); informational here."""
    return RDMA_ALIGNMENT


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _token_sizes(hidden: int, num_topk: int, use_fp8: bool) -> tuple[int, int]:
    """Bytes of one dispatch and one combine token in DeepEP's buffer layout (``Td``, ``Tc``).

    Example (H = 7168, K = 8, BF16): ``(14464, 14400)``.
    """
    packs = -(-hidden // 32) if use_fp8 else 0
    dispatch = (_align(hidden * (1 if use_fp8 else 2), 32) + _align(packs * 4, 32)
                + _align(num_topk * 8 + (num_topk + 1) * 4, 32))
    return dispatch, _align(2 * hidden, 32) + _align(num_topk * 8, 32)


def _check_shape(num_max_tokens_per_rank: int, hidden: int) -> None:
    if num_max_tokens_per_rank <= 0 or hidden <= 0:
        raise ValueError(f"num_max_tokens_per_rank ({num_max_tokens_per_rank}) and hidden ({hidden}) must "
                         "be > 0 to size a buffer")
    if -(-hidden // 32) * 4 > hidden:
        raise ValueError(f"hidden ({hidden}) is too small: DeepEP needs ceil(hidden / 32) * 4 <= hidden")


def dispatch_buffer_size(num_ranks: int, num_nvlink_ranks: int, num_max_tokens_per_rank: int, hidden: int,
                         num_topk: int, use_fp8: bool, hybrid: bool) -> int:
    """Dispatch side of DeepEP's buffer formula (unaligned)."""
    t, k = num_max_tokens_per_rank, num_topk or 32
    token, _ = _token_sizes(hidden, k, use_fp8)
    so, su = (num_ranks // num_nvlink_ranks, num_nvlink_ranks) if hybrid else (1, num_ranks)
    if so == 1:
        return (0 if su == num_nvlink_ranks else 1) * t * token + num_ranks * t * token
    return su * so * t * token + t * token + so * (t + _HYBRID_CHANNELS) * token


def combine_buffer_size(num_ranks: int, num_nvlink_ranks: int, num_max_tokens_per_rank: int, hidden: int,
                        num_topk: int, hybrid: bool, multiple_reduction: bool) -> int:
    """Combine side of DeepEP's buffer formula (unaligned)."""
    t, k = num_max_tokens_per_rank, num_topk or 32
    _, token = _token_sizes(hidden, k, False)
    so, su = (num_ranks // num_nvlink_ranks, num_nvlink_ranks) if hybrid else (1, num_ranks)
    amr = multiple_reduction
    if so == 1:
        nv = su == num_nvlink_ranks
        return ((0 if nv else num_ranks) * t * (1 if amr else k) * token
                + (min(num_ranks, k) if amr else k) * t * token)
    return ((min(su, k) if amr else k) * so * t * token + (min(so, k) if amr else k) * t * token
            + (1 if amr else k) * so * (t + _HYBRID_CHANNELS) * token)


def calculate_buffer_size(num_ranks: int, num_nvlink_ranks: int, num_max_tokens_per_rank: int, hidden: int,
                          num_topk: int = 0, use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                          allow_multiple_reduction: bool = True) -> int:
    """DeepEP V2's buffer size: ``align(max(dispatch, combine), 2 MiB)``; ``num_topk = 0`` sizes
    for 32. Example (8 ranks on one node, T = 4096, H = 7168, K = 8, BF16): 473,956,352."""
    _check_shape(num_max_tokens_per_rank, hidden)
    d = dispatch_buffer_size(num_ranks, num_nvlink_ranks, num_max_tokens_per_rank, hidden, num_topk,
                             use_fp8_dispatch, allow_hybrid_mode)
    c = combine_buffer_size(num_ranks, num_nvlink_ranks, num_max_tokens_per_rank, hidden, num_topk,
                            allow_hybrid_mode, allow_multiple_reduction)
    return _align(max(d, c), ALLOCATION_ALIGNMENT)


def _group_ranks_per_node(group: dist.ProcessGroup) -> int:
    world = group.size()
    for var in ("FLEXEP_RANKS_PER_NODE", "LOCAL_WORLD_SIZE"):
        value = int(os.environ.get(var, "0") or 0)
        if 0 < value <= world and world % value == 0:
            return value
    return world


def get_physical_domain_size(group_or_buffer: Union[dist.ProcessGroup, object]) -> tuple[int, int]:
    """``(num_rdma_ranks, num_nvlink_ranks)``: nodes and ranks per node of a buffer's topology,
    or of a group as the environment describes it (see the module docstring)."""
    topo = getattr(group_or_buffer, "topology", None)
    if topo is not None:
        return topo.num_nodes, topo.ranks_per_node
    per = _group_ranks_per_node(group_or_buffer)
    return group_or_buffer.size() // per, per


def get_logical_domain_size(group_or_buffer: Union[dist.ProcessGroup, object],
                            allow_hybrid_mode: Optional[bool] = None) -> tuple[int, int]:
    """``(num_scaleout_ranks, num_scaleup_ranks)``: the physical domains in hybrid mode, else
    ``(1, W)``. A buffer answers with its own ``allow_hybrid_mode`` unless one is given."""
    if allow_hybrid_mode is None:
        allow_hybrid_mode = getattr(group_or_buffer, "allow_hybrid_mode", True)
    rdma, nvlink = get_physical_domain_size(group_or_buffer)
    return (rdma, nvlink) if allow_hybrid_mode else (1, rdma * nvlink)


def get_buffer_size_hint(group: dist.ProcessGroup, num_max_tokens_per_rank: int, hidden: int,
                         num_topk: int = 0, use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                         allow_multiple_reduction: bool = True) -> int:
    """DeepEP's ``get_buffer_size_hint`` (same value, see :func:`calculate_buffer_size`)."""
    _, nvlink = get_physical_domain_size(group)
    return calculate_buffer_size(group.size(), nvlink, num_max_tokens_per_rank, hidden, num_topk,
                                 use_fp8_dispatch, allow_hybrid_mode, allow_multiple_reduction)


def theoretical_num_sms(num_ranks: int, num_experts: int, num_topk: int, prefer_overlap_with_compute: bool,
                        aligned_to: int = 2) -> int:
    """A positive even SM count for DeepEP's ``num_sms`` knobs (a hint only: flexep's results
    never depend on it). Grows with the expected number of destination ranks of a token,
    ``W * (1 - C(E - E/W, K) / C(E, K))``; at least 64 when not preferring overlap."""
    try:
        local = num_experts // max(1, num_ranks)
        miss = math.comb(num_experts - local, num_topk) / math.comb(num_experts, num_topk)
        destinations = num_ranks * (1 - miss)
    except (ValueError, ZeroDivisionError, TypeError):
        destinations = 1.0
    sms = _align(max(4, math.ceil(4 * destinations)), aligned_to)
    return max(sms, 64) if not prefer_overlap_with_compute else sms


def theoretical_num_qps(num_sms: int, hybrid: bool, num_allocated_qps: int) -> int:
    """DeepEP's queue-pair hint: ``min(num_sms, 9)`` direct, ``16 * num_sms + 1`` hybrid, capped."""
    qps = 16 * num_sms + 1 if hybrid else min(num_sms, 9)
    return min(qps, num_allocated_qps) if num_allocated_qps > 0 else qps


def lb_theoretical_num_sms() -> int:
    """SMs for the load-balancing copies (a hint; DeepEP's NVLink/SM bandwidth ratio)."""
    return _align(math.ceil(max(450 / 180, 450 / 45)), 2)
