"""Bad inputs to every public call: the error type and a message naming the argument.

One table, :data:`CASES`, drives three tests:

* every case on a one-rank Gloo group, in process (cheap);
* a subset on two spawned ranks with the bad input on rank 1 only: rank 1 raises its own
  ``ValueError``/``TypeError`` and rank 0 a :class:`~flexep.RemoteInputError` naming rank 1,
  both within a bounded time (the header round makes local errors collective);
* the one-rank table again under ``python -O``, so no validation relies on ``assert``.

A case names the call (``op``), how it spoils the valid arguments of that call (``spoil``), and
the expected exception type and message pattern. Patterns may use ``{W}`` for the group size
and ``{L}`` for E / W.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

import flexep
from flexep import Buffer, CapacityError, RemoteInputError
from flexep.launch import run_local

T, H, E, K = 4, 128, 8, 2
LL_M = 8  # num_max_dispatch_tokens_per_rank of the low-latency cases


# ---- valid arguments ----------------------------------------------------------------------
@dataclass
class Ctx:
    """A buffer, a second buffer, and valid arguments for each call on this rank."""

    buf: Buffer
    other: Buffer
    x: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor
    layout: tuple
    recv_x: torch.Tensor
    handle: Any
    world: int
    ll_buf: Buffer
    ll_recv_x: torch.Tensor
    ll_handle: Any

    def kwargs(self, op: str) -> dict:
        """Fresh valid keyword arguments for ``op`` (cases mutate them freely)."""
        ntr, _, nte, itr, _ = self.layout
        if op == "layout":
            return dict(topk_idx=self.idx.clone(), num_experts=E)
        if op in ("dispatch", "dispatch_fp8"):
            x = self.x.clone() if op == "dispatch" else fp8(self.x)
            return dict(x=x, num_tokens_per_rank=ntr.clone(), is_token_in_rank=itr.clone(),
                        num_tokens_per_expert=nte.clone(), topk_idx=self.idx.clone(),
                        topk_weights=self.w.clone())
        if op == "cached":
            return dict(x=self.x.clone(), handle=self.handle)
        if op == "combine":
            return dict(x=self.recv_x.clone(), handle=self.handle)
        if op in ("ll_dispatch", "ll_dispatch_on_normal"):
            return dict(x=self.x.clone(), topk_idx=self.idx.clone(),
                        num_max_dispatch_tokens_per_rank=LL_M, num_experts=E, use_fp8=True)
        if op == "ll_combine":
            return dict(x=self.ll_recv_x.clone(), topk_idx=self.idx.clone(),
                        topk_weights=self.w.clone(), handle=self.ll_handle)
        if op == "buffer":
            # ranks_per_node explicit on every rank: left out, it is inferred by a collective
            # hostname exchange that a rank rejecting its arguments would not join
            return dict(group=self.buf.group, timeout=30, ranks_per_node=self.world)
        if op == "set_num_sms":
            return dict(new_num_sms=20)
        raise KeyError(op)


def fp8(x: torch.Tensor) -> tuple:
    """A valid ``(e4m3 [T, H], scales [T, H/128] float32)`` pair."""
    return flexep.utils.per_token_cast_to_fp8(x.float())


def make_ctx(group: dist.ProcessGroup) -> Ctx:
    """Valid inputs (every token reaches every rank of a 1- or 2-rank group) and one dispatch."""
    world, rank = group.size(), group.rank()
    buf, other = Buffer(group, timeout=30), Buffer(group, timeout=30)
    x = (torch.arange(T * H, dtype=torch.float32).view(T, H) % 7 + rank).to(torch.bfloat16)
    idx = torch.tensor([[0, 5], [1, 6], [2, 7], [3, 4]], dtype=torch.int64)
    w = torch.full((T, K), 0.5)
    layout = buf.get_dispatch_layout(idx, E)
    ntr, _, nte, itr, _ = layout
    recv_x, _, _, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=ntr, is_token_in_rank=itr,
                                              num_tokens_per_expert=nte, topk_idx=idx, topk_weights=w)
    ll_buf = Buffer(group, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(LL_M, H, world, E),
                    low_latency_mode=True, timeout=30)
    ll_recv_x, _, ll_handle, _, _ = ll_buf.low_latency_dispatch(x, idx, LL_M, E, use_fp8=False)
    return Ctx(buf, other, x, idx, w, layout, recv_x, handle, world, ll_buf, ll_recv_x, ll_handle)


def call(ctx: Ctx, op: str, kw: dict):
    """Make public call ``op`` with ``kw``."""
    if op == "layout":
        return ctx.buf.get_dispatch_layout(**kw)
    if op in ("dispatch", "dispatch_fp8", "cached"):
        return ctx.buf.dispatch(**kw)
    if op == "combine":
        return ctx.buf.combine(**kw)
    if op == "buffer":
        return Buffer(**kw)
    if op == "ll_dispatch":
        return ctx.ll_buf.low_latency_dispatch(**kw)
    if op == "ll_dispatch_on_normal":
        return ctx.buf.low_latency_dispatch(**kw)
    if op == "ll_combine":
        return ctx.ll_buf.low_latency_combine(**kw)
    if op == "set_num_sms":
        return Buffer.set_num_sms(**kw)
    raise KeyError(op)


# ---- the table ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Bad:
    """One bad input: ``spoil(kw, ctx)`` edits the valid kwargs of ``op`` in place."""

    name: str
    op: str
    spoil: Callable[[dict, Ctx], None]
    exc: type
    match: str
    min_world: int = 1
    remote: type = field(default=RemoteInputError)  # what the other ranks raise (world 2)


def _set(key: str, value: Callable[[dict, Ctx], Any]) -> Callable[[dict, Ctx], None]:
    """A ``spoil`` that replaces ``kw[key]`` by ``value(kw, ctx)``."""
    def spoil(kw: dict, ctx: Ctx) -> None:
        kw[key] = value(kw, ctx)
    return spoil


def _poke(key: str, index: tuple, value) -> Callable[[dict, Ctx], None]:
    def spoil(kw: dict, ctx: Ctx) -> None:
        kw[key][index] = value
    return spoil


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, transposed strides."""
    return t.t().contiguous().t()


CASES = [
    # get_dispatch_layout: topk_idx and num_experts (A1, A2, A5, A6)
    Bad("layout_topk_float", "layout", _set("topk_idx", lambda kw, c: kw["topk_idx"].float()),
        TypeError, r"topk_idx must have dtype int64, int32, got float32"),
    Bad("layout_topk_bool", "layout", _set("topk_idx", lambda kw, c: kw["topk_idx"] > 0),
        TypeError, r"topk_idx must have dtype int64, int32, got bool"),
    Bad("layout_topk_1d", "layout", _set("topk_idx", lambda kw, c: kw["topk_idx"][:, 0].contiguous()),
        ValueError, r"topk_idx must be 2-D, got shape \(4,\)"),
    Bad("layout_topk_3d", "layout", _set("topk_idx", lambda kw, c: kw["topk_idx"][None]),
        ValueError, r"topk_idx must be 2-D, got shape \(1, 4, 2\)"),
    Bad("layout_topk_too_large", "layout", _poke("topk_idx", (1, 0), E), ValueError,
        r"topk_idx\[1, 0\] = 8 is out of range; expected -1 \(unused slot\) or an expert id in \[0, 8\)"),
    Bad("layout_topk_below_minus_one", "layout", _poke("topk_idx", (2, 1), -2), ValueError,
        r"topk_idx\[2, 1\] = -2 is out of range; expected -1"),
    Bad("layout_topk_duplicate", "layout", _poke("topk_idx", (3,), 5), ValueError,
        r"topk_idx row 3 selects an expert twice \(\[5, 5\]\); each expert may appear at most once"),
    Bad("layout_topk_list", "layout", _set("topk_idx", lambda kw, c: kw["topk_idx"].tolist()),
        TypeError, r"topk_idx must be a torch.Tensor, got list"),
    Bad("layout_topk_noncontiguous", "layout", _set("topk_idx", lambda kw, c: _noncontiguous(kw["topk_idx"])),
        ValueError, r"topk_idx must be contiguous \(call .contiguous\(\)\), got strides \(1, 4\)"),
    Bad("layout_num_experts_zero", "layout", _set("num_experts", lambda kw, c: 0),
        ValueError, r"num_experts must be >= 1, got 0"),
    Bad("layout_num_experts_negative", "layout", _set("num_experts", lambda kw, c: -8),
        ValueError, r"num_experts must be >= 1, got -8"),
    Bad("layout_num_experts_float", "layout", _set("num_experts", lambda kw, c: 8.0),
        TypeError, r"num_experts must be an int, got float"),
    Bad("layout_num_experts_indivisible", "layout", _set("num_experts", lambda kw, c: 7),
        ValueError, r"num_experts \(7\) must be divisible by the group size \(2\)", min_world=2),
    Bad("layout_comm_stream_flag", "layout", _set("allocate_on_comm_stream", lambda kw, c: True),
        ValueError, r"allocate_on_comm_stream=True requires previous_event and async_finish=True"),
    # dispatch: x (A3, A4)
    Bad("x_int", "dispatch", _set("x", lambda kw, c: kw["x"].to(torch.int32)), TypeError,
        r"x must have dtype bfloat16, float16, float32, float64, got int32"),
    Bad("x_1d", "dispatch", _set("x", lambda kw, c: kw["x"][0].contiguous()), ValueError,
        r"x must be 2-D, got shape \(128,\)"),
    Bad("x_3d", "dispatch", _set("x", lambda kw, c: kw["x"][None]), ValueError,
        r"x must be 2-D, got shape \(1, 4, 128\)"),
    Bad("x_noncontiguous", "dispatch", _set("x", lambda kw, c: _noncontiguous(kw["x"])), ValueError,
        r"x must be contiguous \(call .contiguous\(\)\), got strides \(1, 4\)"),
    Bad("x_list", "dispatch", _set("x", lambda kw, c: kw["x"].tolist()), TypeError,
        r"x must be a torch.Tensor or an \(x_fp8, scales\) tuple of tensors, got list of list"),
    Bad("x_fp8_without_scales", "dispatch_fp8", _set("x", lambda kw, c: kw["x"][0]), TypeError,
        r"x is float8_e4m3fn without scales; expected \(x_fp8 \[T, H\], scales \[T, H/128\] float32\)"),
    Bad("x_fp8_hidden_not_128", "dispatch_fp8",
        _set("x", lambda kw, c: (kw["x"][0][:, :100].contiguous(), kw["x"][1])), ValueError,
        r"x\[0\]: FP8 hidden size must be a multiple of 128, got 100"),
    Bad("x_fp8_scales_rows", "dispatch_fp8", _set("x", lambda kw, c: (kw["x"][0], kw["x"][1][:3])),
        ValueError, r"x\[1\] \(scales\) must have 4 rows \(one per token\), got shape \(3, 1\)"),
    Bad("x_fp8_scales_dtype", "dispatch_fp8",
        _set("x", lambda kw, c: (kw["x"][0], kw["x"][1].bfloat16())), TypeError,
        r"x\[1\] \(scales\) must have dtype float32, int32, got bfloat16"),
    Bad("x_fp8_tuple_of_three", "dispatch_fp8", _set("x", lambda kw, c: (*kw["x"], kw["x"][1])),
        ValueError, r"x as a tuple must be \(x_fp8 \[T, H\], scales \[T, H/128\]\), got 3 items"),
    Bad("x_fp8_data_bf16", "dispatch_fp8", _set("x", lambda kw, c: (c.x, kw["x"][1])), TypeError,
        r"x\[0\] must have dtype .*float8_e4m3fn.*, got bfloat16"),
    # dispatch: routing arguments (A2, A7)
    Bad("topk_rows", "dispatch", _set("topk_idx", lambda kw, c: kw["topk_idx"][:3]), ValueError,
        r"topk_idx must have 4 rows \(one per token\), got shape \(3, 2\)"),
    Bad("topk_out_of_range", "dispatch", _poke("topk_idx", (0, 1), 99), ValueError,
        r"topk_idx\[0, 1\] = 99 is out of range; expected -1 \(unused slot\) or an expert id in \[0, 8\)"),
    Bad("topk_duplicate", "dispatch", _poke("topk_idx", (2,), 6), ValueError,
        r"topk_idx row 2 selects an expert twice"),
    Bad("topk_device", "dispatch", _set("topk_idx", lambda kw, c: kw["topk_idx"].to("meta")),
        ValueError, r"topk_idx must be on cpu \(same device as x\), got meta"),
    Bad("weights_dtype", "dispatch", _set("topk_weights", lambda kw, c: kw["topk_weights"].bfloat16()),
        TypeError, r"topk_weights must have dtype float32, got bfloat16"),
    Bad("weights_shape", "dispatch", _set("topk_weights", lambda kw, c: torch.ones(T, K + 1)),
        ValueError, r"topk_weights must have the shape of topk_idx \(4, 2\), got \(4, 3\)"),
    Bad("weights_missing", "dispatch", _set("topk_weights", lambda kw, c: None), ValueError,
        r"topk_idx and topk_weights must be given together \(or both None\)"),
    Bad("tokens_per_rank_size", "dispatch",
        _set("num_tokens_per_rank", lambda kw, c: torch.zeros(c.world + 1, dtype=torch.int32)),
        ValueError, r"num_tokens_per_rank must be \[{W}\], got \({W1},\)"),
    Bad("tokens_per_rank_values", "dispatch",
        _set("num_tokens_per_rank", lambda kw, c: kw["num_tokens_per_rank"] + 1), ValueError,
        r"num_tokens_per_rank does not match is_token_in_rank.sum\(0\): got \[.*\], expected \[.*\]"),
    Bad("in_rank_dtype", "dispatch", _set("is_token_in_rank", lambda kw, c: kw["is_token_in_rank"].int()),
        TypeError, r"is_token_in_rank must have dtype bool, got int32"),
    Bad("in_rank_rows", "dispatch", _set("is_token_in_rank", lambda kw, c: kw["is_token_in_rank"][:2]),
        ValueError, r"is_token_in_rank must have 4 rows \(one per token\), got shape \(2, {W}\)"),
    Bad("in_rank_device", "dispatch", _set("x", lambda kw, c: kw["x"].to("meta")), ValueError,
        r"is_token_in_rank must be on meta \(same device as x\), got cpu"),
    Bad("tokens_per_expert_missing", "dispatch", _set("num_tokens_per_expert", lambda kw, c: None),
        TypeError, r"num_tokens_per_expert must be a torch.Tensor, got NoneType"),
    Bad("tokens_per_expert_indivisible", "dispatch",
        _set("num_tokens_per_expert", lambda kw, c: kw["num_tokens_per_expert"][:7]), ValueError,
        r"num_tokens_per_expert.numel\(\) \(7\) must be divisible by the group size \(2\)", min_world=2),
    Bad("alignment_zero", "dispatch", _set("expert_alignment", lambda kw, c: 0), ValueError,
        r"expert_alignment must be >= 1, got 0"),
    Bad("worst_tokens_negative", "dispatch", _set("num_worst_tokens", lambda kw, c: -1), ValueError,
        r"num_worst_tokens must be >= 0, got -1"),
    Bad("worst_tokens_without_topk", "dispatch",
        lambda kw, c: kw.update(num_worst_tokens=64, topk_idx=None, topk_weights=None), ValueError,
        r"num_worst_tokens > 0 requires topk_idx and topk_weights"),
    Bad("worst_tokens_too_small", "dispatch", _set("num_worst_tokens", lambda kw, c: 1), CapacityError,
        r"num_worst_tokens is too small: rank \d receives \d+ > num_worst_tokens 1", remote=CapacityError),
    Bad("config_type", "dispatch", _set("config", lambda kw, c: {"num_sms": 20}), TypeError,
        r"config must be a flexep.Config, got dict"),
    Bad("async_without_event", "dispatch", _set("allocate_on_comm_stream", lambda kw, c: True),
        ValueError, r"allocate_on_comm_stream=True requires previous_event"),
    # cached dispatch and combine: the handle (A7)
    Bad("cached_with_topk", "cached", _set("topk_idx", lambda kw, c: c.idx), ValueError,
        r"cached dispatch \(handle=...\) takes no topk_idx/topk_weights"),
    Bad("cached_handle_tuple", "cached", _set("handle", lambda kw, c: tuple(c.handle)), TypeError,
        r"handle must be the handle returned by Buffer.dispatch, got tuple"),
    Bad("cached_handle_other_buffer", "cached", lambda kw, c: kw.update(handle=_rebound(c)), ValueError,
        r"handle was produced by another Buffer"),
    Bad("cached_x_rows", "cached", _set("x", lambda kw, c: kw["x"][:3]), ValueError,
        r"x must have 4 rows \(the handle's tokens\), got \(3, 128\)"),
    Bad("combine_handle_none", "combine", _set("handle", lambda kw, c: None), TypeError,
        r"handle must be the handle returned by Buffer.dispatch, got NoneType"),
    Bad("combine_handle_other_buffer", "combine", lambda kw, c: kw.update(handle=_rebound(c)),
        ValueError, r"handle was produced by another Buffer"),
    Bad("combine_x_3d", "combine", _set("x", lambda kw, c: kw["x"].unsqueeze(0)), ValueError,
        r"x must be 2-D, got shape \(1, \d+, 128\)"),
    Bad("combine_x_rows", "combine", _set("x", lambda kw, c: kw["x"][1:]), ValueError,
        r"x must have \d+ rows \(one per token\), got shape \(\d+, 128\)"),
    Bad("combine_x_int", "combine", _set("x", lambda kw, c: kw["x"].to(torch.int64)), TypeError,
        r"x must have dtype bfloat16, float16, float32, float64, got int64"),
    Bad("combine_weights_rows", "combine", _set("topk_weights", lambda kw, c: torch.ones(1, K)),
        ValueError, r"topk_weights must have \d+ rows \(one per token\), got shape \(1, 2\)"),
    Bad("combine_bias_shape", "combine", _set("bias", lambda kw, c: torch.zeros(T, 64, dtype=torch.bfloat16)),
        ValueError, r"bias\[0\] must be \[4, 128\], got \(4, 64\)"),
    Bad("combine_bias_triple", "combine", _set("bias", lambda kw, c: [c.x, c.x, c.x]), TypeError,
        r"bias must be None, a tensor or a pair of tensors, got list"),
    # low-latency mode (A4, A7, A8, A9)
    Bad("ll_on_normal_buffer", "ll_dispatch_on_normal", lambda kw, c: None, ValueError,
        r"low_latency_dispatch needs a Buffer created with low_latency_mode=True"),
    Bad("ll_capacity_exceeded", "ll_dispatch",
        lambda kw, c: kw.update(x=kw["x"].repeat(3, 1)[:LL_M + 1],
                                topk_idx=kw["topk_idx"].repeat(3, 1)[:LL_M + 1]),
        CapacityError, r"x has 9 tokens, more than num_max_dispatch_tokens_per_rank \(8\)"),
    Bad("ll_rdma_bytes_too_small", "ll_dispatch",
        _set("num_max_dispatch_tokens_per_rank", lambda kw, c: 4096),
        CapacityError, r"num_rdma_bytes \(\d+\) is smaller than the \d+ bytes low-latency mode needs for "
        r"num_max_dispatch_tokens_per_rank=4096"),
    Bad("ll_capacity_zero", "ll_dispatch", _set("num_max_dispatch_tokens_per_rank", lambda kw, c: 0),
        ValueError, r"num_max_dispatch_tokens_per_rank must be >= 1, got 0"),
    Bad("ll_async_and_hook", "ll_dispatch",
        lambda kw, c: kw.update(async_finish=True, return_recv_hook=True),
        ValueError, r"async_finish=True and return_recv_hook=True are mutually exclusive"),
    Bad("ll_ue8m0_without_round_scale", "ll_dispatch", _set("use_ue8m0", lambda kw, c: True), ValueError,
        r"use_ue8m0=True requires round_scale=True"),
    Bad("ll_fp8_hidden", "ll_dispatch", _set("x", lambda kw, c: kw["x"][:, :100].contiguous()), ValueError,
        r"x: hidden \(100\) must be a multiple of 128 for this FP8 mode"),
    Bad("ll_x_dtype", "ll_dispatch", _set("x", lambda kw, c: kw["x"].to(torch.int16)), TypeError,
        r"x must have dtype bfloat16, float16, float32, float64, got int16"),
    Bad("ll_topk_out_of_range", "ll_dispatch", _poke("topk_idx", (3, 0), -5), ValueError,
        r"topk_idx\[3, 0\] = -5 is out of range; expected -1 \(unused slot\) or an expert id in \[0, 8\)"),
    Bad("ll_num_experts_indivisible", "ll_dispatch", _set("num_experts", lambda kw, c: 7), ValueError,
        r"num_experts \(7\) must be divisible by the group size \(2\)", min_world=2),
    Bad("ll_combine_normal_handle", "ll_combine", _set("handle", lambda kw, c: c.handle), TypeError,
        r"handle must be the handle returned by Buffer.low_latency_dispatch, got NormalHandle"),
    Bad("combine_ll_handle", "combine", _set("handle", lambda kw, c: c.ll_handle), TypeError,
        r"handle must be the handle returned by Buffer.dispatch, got LowLatencyHandle"),
    Bad("ll_combine_x_shape", "ll_combine", _set("x", lambda kw, c: kw["x"][:, :-1].contiguous()), ValueError,
        r"x must be \[{L}, {W8}, 128\] \(the dispatch's \[L, W\*M, H\]\), got \[{L}, {W8m1}, 128\]"),
    Bad("ll_combine_other_routing", "ll_combine", _poke("topk_idx", (0, 0), 3), ValueError,
        r"topk_idx must be the routing this rank dispatched with"),
    Bad("ll_combine_logfmt_zero_copy", "ll_combine", lambda kw, c: kw.update(use_logfmt=True, zero_copy=True),
        ValueError, r"use_logfmt=True and zero_copy=True are mutually exclusive"),
    Bad("ll_combine_out_shape", "ll_combine",
        _set("out", lambda kw, c: torch.empty(T, 64, dtype=torch.bfloat16)),
        ValueError, r"out must be \[4, 128\], got \[4, 64\]"),
    Bad("ll_combine_zero_copy_unfilled", "ll_combine", _set("zero_copy", lambda kw, c: True),
        ValueError,
        r"zero_copy=True reads get_next_low_latency_combine_buffer\(handle\)"),
    # constructor and class helpers (A6); local calls
    Bad("buffer_nvl_bytes", "buffer", _set("num_nvl_bytes", lambda kw, c: 100), ValueError,
        r"num_nvl_bytes must be a multiple of 128, got 100"),
    Bad("buffer_rdma_bytes", "buffer", _set("num_rdma_bytes", lambda kw, c: -128), ValueError,
        r"num_rdma_bytes must be >= 0, got -128"),
    Bad("buffer_timeout", "buffer", _set("timeout", lambda kw, c: 0), ValueError,
        r"timeout must be a positive number of seconds, got 0"),
    Bad("buffer_channels", "buffer", _set("num_channels", lambda kw, c: 0), ValueError,
        r"num_channels must be >= 1, got 0"),
    Bad("buffer_ranks_per_node", "buffer", _set("ranks_per_node", lambda kw, c: 3), ValueError,
        r"ranks_per_node must divide the group size {W}, got 3"),
    Bad("buffer_group_none", "buffer", _set("group", lambda kw, c: None), ValueError,
        r"group must be a torch.distributed ProcessGroup, got None"),
    Bad("buffer_group_type", "buffer", _set("group", lambda kw, c: "WORLD"), TypeError,
        r"group must be a torch.distributed ProcessGroup, got str"),
    Bad("set_num_sms_odd", "set_num_sms", _set("new_num_sms", lambda kw, c: 3), ValueError,
        r"new_num_sms must be even, got 3"),
]

# Cases run with the bad input on one of two ranks (collective calls only).
WORLD2 = ["layout_num_experts_indivisible", "topk_out_of_range", "topk_duplicate", "x_int",
          "x_fp8_hidden_not_128", "weights_shape", "tokens_per_expert_indivisible", "alignment_zero",
          "worst_tokens_too_small",
          "cached_handle_other_buffer", "cached_x_rows", "combine_x_3d", "combine_bias_triple",
          "ll_capacity_exceeded", "ll_topk_out_of_range", "ll_num_experts_indivisible",
          "ll_combine_other_routing", "buffer_nvl_bytes", "buffer_timeout", "buffer_channels",
          "buffer_ranks_per_node"]


def _rebound(ctx: Ctx):
    """``ctx.handle`` as if another Buffer (``ctx.other``) had produced it."""
    return dataclasses.replace(ctx.handle, owner=ctx.other.uid)


def pattern(case: Bad, world: int) -> str:
    subs = {"{W1}": world + 1, "{W8m1}": world * LL_M - 1, "{W8}": world * LL_M, "{W}": world,
            "{L}": E // world}
    out = case.match
    for key, value in subs.items():
        out = out.replace(key, str(value))
    return out


def test_table_is_large_and_distinct():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert len([c for c in CASES if c.min_world == 1]) >= 30
    assert set(WORLD2) <= set(names)


# ---- world 1, in process -----------------------------------------------------------------
@pytest.fixture(scope="module")
def ctx(gloo_world1) -> Ctx:
    return make_ctx(gloo_world1)


@pytest.mark.parametrize("case", [c for c in CASES if c.min_world == 1], ids=lambda c: c.name)
def test_bad_input_world1(ctx: Ctx, case: Bad):
    kw = ctx.kwargs(case.op)
    case.spoil(kw, ctx)
    with pytest.raises(case.exc, match=pattern(case, ctx.world)):
        call(ctx, case.op, kw)


def test_buffer_still_usable_after_bad_inputs(ctx: Ctx):
    """Rejected calls leave the buffer healthy: a valid round trip still matches."""
    out, _, _ = ctx.buf.combine(ctx.recv_x, ctx.handle)
    assert torch.equal(out, ctx.x)


def test_validate_false_skips_value_checks(gloo_world1):
    """``validate=False`` skips content checks (no device sync), never the shape checks."""
    buf = Buffer(gloo_world1, timeout=30, validate=False)
    dup = torch.tensor([[1, 1]])
    buf.get_dispatch_layout(dup, E)  # content not read
    with pytest.raises(TypeError, match="topk_idx must have dtype"):
        buf.get_dispatch_layout(dup.float(), E)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(sys.flags.optimize > 0, reason="already running under python -O")
def test_validation_survives_python_O():
    """A11: under ``python -O`` (asserts stripped) every case still raises the same error."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-O", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           os.path.join(root, "tests", "test_bad_inputs.py"), "-k", "world1"],
                          cwd=root, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


# ---- world 2: bad input on one rank ------------------------------------------------------
def _world2_worker(rank: int, world: int, names: list) -> list:
    """Run each named case with the bad input on rank 1 only; report what each rank raised."""
    ctx = make_ctx(dist.group.WORLD)
    by_name = {c.name: c for c in CASES}
    report = []
    for name in names:
        case = by_name[name]
        kw = ctx.kwargs(case.op)
        if rank == 1 or case.op == "layout":  # a local call is spoiled on both ranks
            case.spoil(kw, ctx)
        start = time.monotonic()
        try:
            call(ctx, case.op, kw)
            report.append((name, None, "", time.monotonic() - start, ()))
        except Exception as exc:  # noqa: BLE001 - the parent checks type and message
            mro = tuple(k.__name__ for k in type(exc).__mro__)
            report.append((name, mro, str(exc), time.monotonic() - start, getattr(exc, "ranks", ())))
    out, _, _ = ctx.buf.combine(ctx.recv_x, ctx.handle)  # still healthy afterwards
    report.append(("healthy", None, "", 0.0, tuple(out.shape)))
    return report


@pytest.mark.faults
@pytest.mark.timeout(120)
def test_bad_input_on_one_of_two_ranks_raises_on_both():
    results = run_local(_world2_worker, 2, (WORLD2,), timeout=100)
    by_name = {c.name: c for c in CASES}
    for (name, mro0, msg0, t0, ranks0), (_, mro1, msg1, t1, _) in zip(results[0][:-1], results[1][:-1]):
        case = by_name[name]
        assert mro1 is not None and case.exc.__name__ in mro1, (name, msg1)
        assert re.search(pattern(case, 2), msg1), (name, msg1)
        if case.op == "layout":  # local call: both ranks had the bad input
            assert mro0 == mro1 and msg0 == msg1, (name, msg0, msg1)
        else:
            assert mro0 is not None and case.remote.__name__ in mro0, (name, mro0, msg0)
            assert 1 in ranks0 and "rank" in msg0, (name, msg0)
        assert max(t0, t1) < 10.0, (name, t0, t1)  # one header round, far below the 30 s timeout
    assert results[0][-1][0] == results[1][-1][0] == "healthy"
    assert results[0][-1][-1] == (T, H)
