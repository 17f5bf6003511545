"""Normal-mode dispatch/combine on Gloo ranks against the single-process oracle.

One spawn per (world size, node shape, channels) runs every scenario; the parent rebuilds all
ranks' inputs from the same seeds and checks each rank's outputs against
:mod:`flexep.reference`, so no checking logic runs inside the workers.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist
from inputs import make_x, routing, weights

import flexep
from flexep.launch import run_local
from flexep.quant import per_token_cast_back
from flexep.reference import ref_combine, ref_dispatch, ref_layout

pytestmark = pytest.mark.ranks

HIDDEN = 512


def scenarios(world: int) -> list[dict]:
    """Routing/dtype cases; token counts differ per rank (``tokens[r]``)."""
    uneven = [5 + 3 * r for r in range(world)]
    cases = [
        dict(name="random_bf16", experts=8 * world, topk=4, pattern="random", x="bf16", tokens=uneven),
        dict(name="holes_fp32", experts=4 * world, topk=3, pattern="holes", x="fp32", tokens=uneven),
        dict(name="fp16_k1", experts=4, topk=1, pattern="random", x="fp16", tokens=uneven)
        if world <= 4 else None,
        dict(name="k8_256", experts=256, topk=8, pattern="random", x="bf16", tokens=[16] * world),
        dict(name="one_rank", experts=4 * world, topk=2, pattern="one_rank", x="bf16", tokens=uneven),
        dict(name="all_minus_one", experts=4 * world, topk=2, pattern="none", x="bf16", tokens=uneven),
        dict(name="zero_tokens_on_last", experts=8 * world, topk=2, pattern="random", x="fp32",
             tokens=[4] * (world - 1) + [0]),
        dict(name="one_token", experts=4 * world, topk=2, pattern="random", x="bf16", tokens=[1] * world),
        dict(name="all_zero_tokens", experts=4 * world, topk=2, pattern="random", x="bf16",
             tokens=[0] * world),
        dict(name="fp8", experts=8 * world, topk=4, pattern="holes", x="fp8", tokens=uneven),
        dict(name="fp8_colmajor", experts=8 * world, topk=4, pattern="random", x="fp8_colmajor",
             tokens=uneven),
        dict(name="ue8m0", experts=8 * world, topk=4, pattern="random", x="ue8m0", tokens=uneven),
        dict(name="no_topk", experts=8 * world, topk=4, pattern="random", x="bf16", tokens=uneven,
             no_topk=True),
        dict(name="aligned", experts=8 * world, topk=4, pattern="random", x="bf16", tokens=uneven,
             alignment=4),
        dict(name="worst_tokens", experts=8 * world, topk=4, pattern="holes", x="bf16", tokens=uneven,
             worst=True),
    ]
    return [c for c in cases if c is not None]


def build_inputs(case: dict, rank: int, world: int) -> dict:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case['name']}/{rank}/{world}".encode()))
    n = case["tokens"][rank]
    topk = routing(gen, n, case["experts"], case["topk"], case["pattern"], world)
    return dict(x=make_x(gen, rank, n, HIDDEN, case["x"]), topk=topk, w=weights(gen, topk))


def _plain(x) -> torch.Tensor:
    """FP8 tuples dequantised to float32 (what a model would feed to combine)."""
    return per_token_cast_back(*x) if isinstance(x, tuple) else x


def _run_scenarios(rank: int, world: int, ranks_per_node, num_channels: int) -> dict:
    buf = flexep.Buffer(dist.group.WORLD, int(2e9), 0, ranks_per_node=ranks_per_node,
                        num_channels=num_channels, explicitly_destroy=True)
    out = {}
    for case in scenarios(world):
        inp = build_inputs(case, rank, world)
        x, topk, w = inp["x"], inp["topk"], inp["w"]
        n_rank, n_rdma, n_expert, in_rank, _ = buf.get_dispatch_layout(topk, case["experts"])
        worst = sum(case["tokens"]) if case.get("worst") else 0
        kw = {} if case.get("no_topk") else dict(topk_idx=topk, topk_weights=w)
        recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(
            x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
            is_token_in_rank=in_rank, num_tokens_per_expert=n_expert,
            expert_alignment=case.get("alignment", 1), num_worst_tokens=worst, **kw)
        cached, *rest = buf.dispatch(x, handle=handle)
        # Combine what was received (dequantised for FP8) with the received weights and a bias.
        y = _plain(recv_x).to(torch.float32 if isinstance(recv_x, tuple) else _plain(recv_x).dtype)
        bias = torch.ones(x[0].size(0) if isinstance(x, tuple) else x.size(0), HIDDEN, dtype=y.dtype)
        combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w, bias=bias)
        # Combine may return narrower rows than were dispatched (DeepEP takes the width from x).
        narrow, _, _ = buf.combine(y[:, : HIDDEN // 4].contiguous(), handle)
        out[case["name"]] = dict(
            layout=(n_rank, n_rdma, n_expert, in_rank), recv_x=recv_x, recv_idx=recv_idx,
            recv_w=recv_w, counts=counts, cached=cached, cached_rest=rest[:4],
            prefix=handle[0] if len(handle) == 6 else handle[-4], handle_len=len(handle),
            recv_src_idx=handle.recv_src_idx, combined=combined, combined_w=combined_w, narrow=narrow,
            traffic=buf.last_traffic)
    buf.destroy()
    return out


def _equal(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_equal(u, v) for u, v in zip(a, b))
    return torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point and a.element_size() == 1
                       else a, b.view(torch.uint8) if b.dtype.is_floating_point and b.element_size() == 1
                       else b)


def _rows(x, sl):
    return tuple(t[sl] for t in x) if isinstance(x, tuple) else x[sl]


def check_world(world: int, ranks_per_node=None, num_channels: int = 1) -> None:
    results = run_local(_run_scenarios, world, (ranks_per_node, num_channels), timeout=240)
    for case in scenarios(world):
        name = case["name"]
        inputs = [build_inputs(case, r, world) for r in range(world)]
        xs = [_plain(i["x"]) if isinstance(i["x"], tuple) else i["x"] for i in inputs]
        raw = [i["x"] for i in inputs]
        ref = ref_dispatch(xs, [i["topk"] for i in inputs], case["experts"], [i["w"] for i in inputs])
        for r in range(world):
            got = results[r][name]
            msg = f"{name} rank {r}"
            lay = ref_layout(inputs[r]["topk"], case["experts"], world, ranks_per_node)
            assert torch.equal(got["layout"][0], lay.num_tokens_per_rank), msg
            assert torch.equal(got["layout"][2], lay.num_tokens_per_expert), msg
            assert torch.equal(got["layout"][3], lay.is_token_in_rank), msg
            num_recv = len(ref[r].recv_src)
            # Rows grouped by source rank, in source order: compare the exact bytes.
            expect_x = _gather_raw(raw, ref[r].recv_src)
            assert _equal(_rows(got["recv_x"], slice(0, num_recv)), expect_x), msg
            assert _equal(_rows(got["cached"], slice(0, num_recv)), expect_x), msg + " (cached)"
            assert got["cached_rest"] == [None, None, None, None], msg
            src_idx = torch.tensor([t for _, t in ref[r].recv_src], dtype=torch.int32)
            assert torch.equal(got["recv_src_idx"][:num_recv], src_idx), msg
            # DeepEP's tests read the by-source grouping from handle[0] (one node) or
            # handle[-4] (several nodes: this rank's column of the prefix matrix).
            want_prefix = ref[r].rank_prefix_matrix
            if got["handle_len"] != 6:
                want_prefix = want_prefix[:, r]
            assert torch.equal(got["prefix"], want_prefix), msg
            if case.get("no_topk"):
                assert got["recv_idx"] is None and got["recv_w"] is None, msg
            else:
                assert torch.equal(got["recv_idx"][:num_recv], ref[r].recv_topk_idx), msg
                assert torch.equal(got["recv_w"][:num_recv], ref[r].recv_topk_weights), msg
            if case.get("worst"):
                worst = sum(case["tokens"])
                assert got["counts"] == [], msg
                assert _rows(got["recv_x"], slice(None)).shape[0] == worst if not isinstance(
                    got["recv_x"], tuple) else got["recv_x"][0].shape[0] == worst, msg
                assert (got["recv_idx"][num_recv:] == -1).all(), msg
            else:
                align = case.get("alignment", 1)
                expect = [(c + align - 1) // align * align for c in ref[r].num_recv_tokens_per_expert]
                assert got["counts"] == expect, msg
            # The bytes this rank sent equal the routing's minimum (per-rank dedup).
            tr = got["traffic"]
            assert tr.payload == tr.minimum, msg
        _check_combine(case, inputs, ref, results, world)


def _gather_raw(raw, recv_src):
    if isinstance(raw[0], tuple):
        parts = [torch.stack([raw[s][i][t] for s, t in recv_src]) if recv_src else raw[0][i][:0]
                 for i in range(2)]
        return parts[0], parts[1].contiguous()
    return torch.stack([raw[s][t] for s, t in recv_src]) if recv_src else raw[0][:0]


def _check_combine(case, inputs, ref, results, world):
    """combine(dispatch(x)) = bias + x * (ranks that received each token); weights likewise."""
    ys = []
    for r in range(world):
        num_recv = len(ref[r].recv_src)
        rx = results[r][case["name"]]["recv_x"]
        y = _plain(rx) if isinstance(rx, tuple) else rx
        ys.append(y[:num_recv])
    weights_in = None if case.get("no_topk") else [results[r][case["name"]]["recv_w"][:len(ref[r].recv_src)]
                                                    for r in range(world)]
    expect = ref_combine(ys, ref, [i["topk"].size(0) for i in inputs], weights_in)
    for r in range(world):
        got = results[r][case["name"]]
        want = expect[r][0] + 1.0  # the bias of ones
        tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(got["combined"].dtype, 1e-2)
        torch.testing.assert_close(got["combined"].double(), want, rtol=tol, atol=tol,
                                   msg=f"{case['name']} rank {r} combine")
        torch.testing.assert_close(got["narrow"].double(), expect[r][0][:, : HIDDEN // 4], rtol=tol,
                                   atol=tol, msg=f"{case['name']} rank {r} narrow combine")
        if weights_in is not None:
            torch.testing.assert_close(got["combined_w"].double(), expect[r][1], rtol=1e-6, atol=1e-6)
            # Non-local slots came back as 0, so the sum recovers the original weights.
            orig = inputs[r]["w"].double() * (inputs[r]["topk"] >= 0)
            torch.testing.assert_close(got["combined_w"].double(), orig, rtol=1e-6, atol=1e-6)


def test_world1():
    check_world(1)


def test_world2():
    check_world(2)


def test_world4():
    check_world(4)


def test_world4_two_channels():
    check_world(4, num_channels=2)
