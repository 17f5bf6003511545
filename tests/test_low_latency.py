"""Low-latency mode: fixed-capacity dispatch/combine against the oracle, and no host syncs.

Cheapest first: size-hint and index math (no processes), the local pack/expand/reduce path
under ``torch.compile(fullgraph=True)``, then one spawn per world size (Gloo, 1, 2, 4 ranks)
that runs every scenario against :mod:`flexep.reference`. Inputs are rank-stamped (channel 0
= source rank, channel 1 = token index) so a misrouted row names itself.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import flexep
from flexep.algorithms import low_latency as ll
from flexep.errors import CapacityError, RemoteInputError
from flexep.launch import run_local
from flexep.quant import per_token_cast_back, per_token_cast_to_fp8
from flexep.reference import ref_dispatch, ref_ll_combine, ref_ll_dispatch
from flexep.utils import calc_diff

M, H, K = 16, 512, 4  # capacity per rank, hidden (UE8M0 needs H % 512 == 0), top-k


# ---- pure math ------------------------------------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    ((128, 7168, 8, 288), 2_146_961_792),
    ((128, 7168, 8, 256), 1_908_410_496),
    ((16, 5120, 8, 256), 170_395_776),
])
def test_size_hint_matches_deepep_worked_examples(args, expected):
    assert flexep.Buffer.get_low_latency_rdma_size_hint(*args) == expected
    assert ll.rdma_size_hint(*args) == expected


def test_size_hint_rejects_bad_arguments():
    with pytest.raises(ValueError, match="hidden must be >= 1, got 0"):
        flexep.Buffer.get_low_latency_rdma_size_hint(128, 0, 8, 256)


def test_send_index_worked_example():
    topk = torch.tensor([[0, 3], [1, -1], [2, 3]])
    assert ll.send_index(topk, 4, 2, 3).tolist() == [0, 1, 3, 0, 2, 3]
    assert ll.send_index(torch.zeros(0, 2, dtype=torch.long), 4, 2, 3).tolist() == [0] * 6


def test_wire_row_worked_example():
    row = ll.WireRow.of(256, 2, torch.bfloat16, use_fp8=True, use_ue8m0=False)
    assert (row.scale_offset, row.src_offset, row.ids_offset, row.ids_end, row.nbytes) == \
        (256, 264, 268, 276, 288)
    assert ll.WireRow.of(256, 2, torch.bfloat16, use_fp8=False, use_ue8m0=False).nbytes == 528


def test_odd_hidden_bf16_round_trip():
    """Any hidden works in BF16 (rows stay aligned); world 1, the wire is the identity."""
    x = torch.arange(15, dtype=torch.float32).view(5, 3).to(torch.bfloat16)
    topk = torch.tensor([[1, -1], [0, 1], [-1, -1], [1, 0], [0, -1]])
    row = ll.WireRow.of(3, 2, torch.bfloat16, use_fp8=False, use_ue8m0=False)
    assert (row.data_bytes, row.src_offset, row.ids_end, row.nbytes) == (6, 8, 20, 32)
    index = ll.send_index(topk, 2, 1, 5)
    out = ll.DispatchOutputs.allocate(2, 1, 5, 2, row, 3, torch.bfloat16, False, False, x.device)
    ll.expand_dispatch(ll.pack_dispatch(x, topk, index, row, False, False, False), out, row, 0, 1)
    assert out.recv_count.tolist() == [3, 3]
    assert out.recv_src_info()[:, :3].tolist() == [[1, 3, 4], [0, 1, 3]]
    assert torch.equal(out.recv_x()[0, :3], x[[1, 3, 4]]) and torch.equal(out.recv_x()[1, :3], x[[0, 1, 3]])


def test_as_words_views_rows_as_the_widest_word():
    x = torch.zeros(4, 6, dtype=torch.bfloat16)
    assert ll.as_words(x).shape == (4, 3) and ll.as_words(x).dtype == torch.int32
    assert ll.as_words(torch.zeros(2, 16, dtype=torch.uint8)).dtype == torch.int64
    assert ll.as_words(torch.zeros(2, 16, dtype=torch.uint8)[:, 1:4]).dtype == torch.uint8


def _local_round_trip(x, topk_idx, weights, y_scale):
    """World-1 LL dispatch + combine without communication (the wire is the identity)."""
    num_experts, capacity = 8, x.size(0)
    row = ll.WireRow.of(x.size(1), topk_idx.size(1), x.dtype, use_fp8=True, use_ue8m0=True)
    index = ll.send_index(topk_idx, num_experts, 1, capacity)
    wire = ll.pack_dispatch(x, topk_idx, index, row, use_fp8=True, round_scale=True, use_ue8m0=True)
    out = ll.DispatchOutputs.allocate(num_experts, 1, capacity, topk_idx.size(1), row, x.size(1),
                                      x.dtype, True, True, x.device)
    ll.expand_dispatch(wire, out, row, rank=0, num_ranks=1)
    data, scales = out.recv_x()
    y = (per_token_cast_back(data, scales) * y_scale).to(torch.bfloat16)
    w = torch.cat([weights, weights.new_zeros(1, weights.size(1))]).index_select(0, index)
    partial = ll.reduce_owner(y, out.recv_slot, w)
    return ll.sum_partials(partial, index, x.size(0)), out.recv_count


@pytest.mark.slow
def test_local_path_compiles_without_graph_breaks():
    """``fullgraph=True`` fails on any ``.item()``/``.tolist()``/data-dependent shape."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 512, generator=g).to(torch.bfloat16)
    topk = torch.tensor([[0, 5], [1, -1], [7, 2], [-1, -1], [3, 4], [6, 0]])
    w = torch.rand(6, 2, generator=g)
    scale = torch.tensor(2.0)
    compiled = torch.compile(_local_round_trip, fullgraph=True, backend="eager")
    got, count = compiled(x, topk, w, scale)
    want, want_count = _local_round_trip(x, topk, w, scale)
    assert torch.equal(got, want) and torch.equal(count, want_count)
    assert count.tolist() == [2, 1, 1, 1, 1, 1, 1, 1]


# ---- multi-rank helpers (run inside the workers) ------------------------------------------
def _inputs(world: int, num_experts: int, seed: int, tokens: list, all_unused: bool = False):
    """Rank-stamped ``xs [T_r, H] bf16``, ``topk [T_r, K]`` with -1 slots, ``weights [T_r, K]``."""
    g = torch.Generator().manual_seed(seed)
    xs, topk, weights = [], [], []
    for r in range(world):
        n = tokens[r % len(tokens)]
        x = (torch.randn(n, H, generator=g) * 0.5).to(torch.bfloat16)
        x[:, 0], x[:, 1] = r, torch.arange(n)
        idx = torch.stack([torch.randperm(num_experts, generator=g)[:K] for _ in range(n)]) \
            if n else torch.zeros(0, K, dtype=torch.int64)
        idx[torch.rand(n, K, generator=g) < 0.2] = -1
        if n:
            idx[0] = -1  # a token routed nowhere
        if all_unused:
            idx.fill_(-1)
        xs.append(x)
        topk.append(idx)
        weights.append(torch.rand(n, K, generator=g))
    return xs, topk, weights


def _buffer(num_experts: int, **kw) -> flexep.Buffer:
    size = flexep.Buffer.get_low_latency_rdma_size_hint(M, H, dist.get_world_size(), num_experts)
    kw.setdefault("num_rdma_bytes", size)
    return flexep.Buffer(dist.group.WORLD, low_latency_mode=True, **kw)


def _blocks(handle, num_ranks: int, local: int):
    """``{(l, s): (start, count)}`` decoded from ``recv_layout_range``."""
    rng = handle[1]
    return {(lo, s): (int(rng[lo, s]) >> 32, int(rng[lo, s]) & 0xFFFFFFFF)
            for lo in range(local) for s in range(num_ranks)}


def _check_dispatch(rank, world, num_experts, xs, topk, res, fp8=None):
    """DeepEP's checks plus exact slot contents. ``fp8``: None or ``(round_scale, use_ue8m0)``."""
    recv_x, recv_count, handle = res[0], res[1], res[2]
    local, rows = num_experts // world, world * M
    ref = ref_ll_dispatch(xs, topk, num_experts)[rank]
    all_topk = torch.cat(topk)
    expected = [int((all_topk == rank * local + lo).sum()) for lo in range(local)]
    assert recv_count.dtype == torch.int32 and recv_count.tolist() == ref["count"] == expected
    src_info, layout = handle[0], handle[1]
    assert src_info.shape == (local, rows) and src_info.dtype == torch.int32
    assert layout.shape == (local, world) and layout.dtype == torch.int64
    assert tuple(handle)[2:] == (M, H, num_experts) and len(handle) == 5
    data = recv_x[0] if fp8 else recv_x
    assert data.shape == (local, rows, H)
    if fp8:
        _check_scales_layout(recv_x[1], local, rows, fp8[1])
    blocks = _blocks(handle, world, local)
    for lo in range(local):
        n = int(recv_count[lo])
        assert sum(blocks[lo, s][1] for s in range(world)) == n
        starts = [blocks[lo, s][0] for s in range(world)]
        assert starts == sorted(starts) and (world == 0 or starts[0] == 0)
        got = []
        for s in range(world):
            start, cnt = blocks[lo, s]
            ts = src_info[lo, start:start + cnt].tolist()
            want = [t for (ss, t) in ref["tokens"][lo] if ss == s]
            assert ts == want, f"expert {lo} source {s}: tokens {ts}, expected {want}"
            got += [(s, t) for t in ts]
        assert sorted(got) == sorted(ref["tokens"][lo])
        assert (src_info[lo, n:] == -1).all()
        for slot, (s, t) in enumerate(got):
            _check_row(recv_x, lo, slot, xs[s][t], s, t, fp8)


def _check_scales_layout(scales, local, rows, ue8m0):
    cols = H // 512 if ue8m0 else H // 128
    assert scales.dtype == (torch.int32 if ue8m0 else torch.float32)
    assert scales.shape == (local, rows, cols)
    assert scales.stride() == (cols * rows, 1, rows), scales.stride()


def _check_row(recv_x, lo, slot, x, s, t, fp8):
    if not fp8:
        assert torch.equal(recv_x[lo, slot], x), f"slot ({lo}, {slot}) does not hold token {t} of rank {s}"
        return
    q, scales = per_token_cast_to_fp8(x.unsqueeze(0), round_scale=fp8[0], use_ue8m0=fp8[1])
    got_q, got_s = recv_x[0][lo, slot], recv_x[1][lo, slot]
    assert torch.equal(got_q.view(torch.uint8), q[0].view(torch.uint8))
    assert torch.equal(got_s, scales[0])
    deq = per_token_cast_back(got_q.unsqueeze(0), got_s.unsqueeze(0))[0]
    ones = torch.ones(got_q.shape).to(got_q.dtype)  # torch 2.4 cannot fill float8 tensors
    block_scale = per_token_cast_back(ones.unsqueeze(0), got_s.unsqueeze(0))[0]
    tol = 0.0625 * x.float().abs() + block_scale * 2.0 ** -9
    assert ((deq - x.float()).abs() <= tol).all(), f"FP8 slot ({lo}, {slot}) off for token {t} of {s}"
    assert calc_diff(deq, x.float()) < 1e-3


def _expert_scale(e: int) -> float:
    return 1.0 + (e % 5) / 4


def _expert_outputs(rank, world, num_experts, recv_x, recv_count):
    """Each expert scales its tokens; unused slots are NaN, so reading one shows up."""
    local = num_experts // world
    y = torch.full_like(recv_x, float("nan"))
    for lo in range(local):
        n = int(recv_count[lo])
        y[lo, :n] = (recv_x[lo, :n].float() * _expert_scale(rank * local + lo)).to(torch.bfloat16)
    return y


def _check_combine(rank, xs, topk, weights, combined):
    ref = ref_ll_combine(lambda e, s, t: (xs[s][t].float() * _expert_scale(e)).to(torch.bfloat16),
                         topk, weights, H)[rank]
    bound = ref_ll_combine(lambda e, s, t: (xs[s][t].float() * _expert_scale(e)).abs(),
                           topk, [w.abs() for w in weights], H)[rank]
    assert combined.shape == (xs[rank].size(0), H) and combined.dtype == torch.bfloat16
    assert not combined.isnan().any()
    err = (combined.double() - ref).abs()
    assert (err <= 2.0 ** -6 * bound + 1e-6).all(), f"combine off by {float(err.max())}"
    unused = (topk[rank] < 0).all(1)
    assert (combined[unused] == 0).all()
    if combined.numel():
        assert calc_diff(combined, ref) < 1e-5


@contextlib.contextmanager
def _no_host_sync():
    """Raise on anything that reads a tensor value on the host (item, tolist, bool, nonzero...)."""
    banned_ops = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::equal",
                  "aten::is_nonzero", "aten::unique_consecutive", "aten::_unique2"}

    class Guard(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in banned_ops:
                raise AssertionError(f"host sync on the LL path: {func._schema.name}")
            return func(*args, **(kwargs or {}))

    def banned(name):
        def fail(*_a, **_k):
            raise AssertionError(f"host sync on the LL path: Tensor.{name}")
        return fail

    names = ("tolist", "item", "__bool__", "__int__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, banned(n))
        with Guard():
            yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


# ---- the worker ---------------------------------------------------------------------------
def _worker(rank: int, world: int) -> str:
    torch.manual_seed(rank)
    num_experts = 8 * world if world > 1 else 8
    local = num_experts // world
    tokens = [M, 0, 7, M - 1]  # exactly M tokens, a rank with none, partial batches
    buf = _buffer(num_experts)
    xs, topk, w = _inputs(world, num_experts, 1, tokens)

    # BF16: exact data movement, async_finish, then combine three ways (plain, out=, zero_copy).
    wait_stats = torch.zeros(world, dtype=torch.int64)  # accepted and left unchanged
    res = buf.low_latency_dispatch(xs[rank], topk[rank], M, num_experts, use_fp8=False, async_finish=True,
                                   dispatch_wait_recv_cost_stats=wait_stats)
    res[3].current_stream_wait()
    assert res[4] is None
    _check_dispatch(rank, world, num_experts, xs, topk, res)
    y = _expert_outputs(rank, world, num_experts, res[0], res[1])
    combined, event, hook = buf.low_latency_combine(y, topk[rank], w[rank], res[2],
                                                    combine_wait_recv_cost_stats=wait_stats)
    assert hook is None and event.event is None and not wait_stats.any()
    _check_combine(rank, xs, topk, w, combined)
    out = torch.full((xs[rank].size(0), H), 7.0, dtype=torch.bfloat16)
    again, _, _ = buf.low_latency_combine(y, topk[rank], w[rank], res[2], out=out)
    assert again is out and torch.equal(out, combined)
    zbuf = buf.get_next_low_latency_combine_buffer(res[2])
    assert zbuf.shape == (local, world * M, H) and zbuf.dtype == torch.bfloat16
    zbuf.copy_(y)
    ignored = torch.full_like(y, float("nan"))
    zc, _, _ = buf.low_latency_combine(ignored, topk[rank], w[rank], res[2], zero_copy=True)
    assert torch.equal(zc, combined)

    # FP8 in its three scale modes; the last one through the receive hook.
    for round_scale, ue8m0, use_hook in ((False, False, False), (True, False, False), (True, True, True)):
        res = buf.low_latency_dispatch(xs[rank], topk[rank], M, num_experts, use_fp8=True,
                                       round_scale=round_scale, use_ue8m0=ue8m0, return_recv_hook=use_hook)
        if use_hook:
            res[4]()
        _check_dispatch(rank, world, num_experts, xs, topk, res, fp8=(round_scale, ue8m0))

    # Hooks: three dispatches in flight at once, received in reverse order, then a hooked
    # combine; every result stays valid (buffers are reused only once released).
    stats = torch.zeros(local, dtype=torch.int32)
    rounds = [_inputs(world, num_experts, 10 + i, tokens[i:] + tokens[:i]) for i in range(3)]
    pending = [buf.low_latency_dispatch(r[0][rank], r[1][rank], M, num_experts, use_fp8=i % 2 == 1,
                                        cumulative_local_expert_recv_stats=stats, return_recv_hook=True)
               for i, r in enumerate(rounds)]
    for p in reversed(pending):
        p[4]()
    assert stats.tolist() == [sum(int(p[1][lo]) for p in pending) for lo in range(local)]
    for i, (r, p) in enumerate(zip(rounds, pending)):
        _check_dispatch(rank, world, num_experts, r[0], r[1], p, fp8=(False, False) if i % 2 else None)
    xs2, topk2, w2 = rounds[0]
    y2 = _expert_outputs(rank, world, num_experts, pending[0][0], pending[0][1])
    combined2, _, hook = buf.low_latency_combine(y2, topk2[rank], w2[rank], pending[0][2],
                                                 return_recv_hook=True)
    hook()
    _check_combine(rank, xs2, topk2, w2, combined2)
    _check_combine(rank, xs, topk, w, combined)  # the first result is untouched

    # Nothing routed anywhere: every expert receives nothing, combine gives zeros.
    xe, te, we = _inputs(world, num_experts, 3, [3, 0], all_unused=True)
    res = buf.low_latency_dispatch(xe[rank], te[rank], M, num_experts, use_fp8=False)
    assert res[1].tolist() == [0] * local and (res[2][1] == 0).all() and (res[2][0] == -1).all()
    ze, _, _ = buf.low_latency_combine(res[0], te[rank], we[rank], res[2])
    assert ze.shape == (xe[rank].size(0), H) and (ze == 0).all()

    _normal_and_low_latency_on_one_buffer(rank, world, num_experts, buf, xs, topk)
    _errors(rank, world, num_experts, buf, xs, topk, w)
    _no_sync_path(rank, world, num_experts, xs, topk, w)
    return "ok"


def _normal_and_low_latency_on_one_buffer(rank, world, num_experts, buf, xs, topk):
    def normal_round():
        layout = buf.get_dispatch_layout(topk[rank], num_experts)
        recv_x, _, _, _, handle, _ = buf.dispatch(xs[rank], num_tokens_per_rank=layout[0],
                                                  is_token_in_rank=layout[3],
                                                  num_tokens_per_expert=layout[2])
        assert torch.equal(recv_x, ref_dispatch(xs, topk, num_experts)[rank].recv_x)
        combined, _, _ = buf.combine(recv_x, handle)
        ranks = layout[3].sum(1, keepdim=True).float()
        assert torch.allclose(combined.float(), xs[rank].float() * ranks, rtol=1e-2)

    normal_round()
    buf.clean_low_latency_buffer(M, H, num_experts)  # DeepEP needs it; flexep accepts it
    res = buf.low_latency_dispatch(xs[rank], topk[rank], M, num_experts, use_fp8=False)
    _check_dispatch(rank, world, num_experts, xs, topk, res)
    normal_round()  # and back, without cleaning


def _errors(rank, world, num_experts, buf, xs, topk, w):
    # More tokens than the capacity on rank 0: it names the argument; the others learn of it.
    big = torch.zeros(M + 1, H, dtype=torch.bfloat16)
    big_topk = torch.full((M + 1, K), -1, dtype=torch.int64)
    x0, t0 = (big, big_topk) if rank == 0 else (xs[rank], topk[rank])
    if rank == 0:
        msg = r"x has 17 tokens, more than num_max_dispatch_tokens_per_rank \(16\)"
        with pytest.raises(CapacityError, match=msg):
            buf.low_latency_dispatch(x0, t0, M, num_experts)
    else:
        with pytest.raises(RemoteInputError, match=r"rank\(s\) \[0\] rejected"):
            buf.low_latency_dispatch(x0, t0, M, num_experts)
    # A buffer smaller than DeepEP's size hint.
    need = flexep.Buffer.get_low_latency_rdma_size_hint(M, H, world, num_experts)
    small = _buffer(num_experts, num_rdma_bytes=need - 128)
    with pytest.raises(CapacityError, match=f"num_rdma_bytes \\({need - 128}\\) is smaller than the {need}"):
        small.low_latency_dispatch(xs[rank], topk[rank], M, num_experts)
    with pytest.raises(CapacityError, match="num_rdma_bytes"):
        small.clean_low_latency_buffer(M, H, num_experts)
    normal = flexep.Buffer(dist.group.WORLD)
    with pytest.raises(ValueError, match="low_latency_mode=True"):
        normal.low_latency_dispatch(xs[rank], topk[rank], M, num_experts)
    with pytest.raises(ValueError, match="mutually exclusive"):
        buf.low_latency_dispatch(xs[rank], topk[rank], M, num_experts, async_finish=True,
                                 return_recv_hook=True)
    with pytest.raises(ValueError, match="use_ue8m0=True requires round_scale=True"):
        buf.low_latency_dispatch(xs[rank], topk[rank], M, num_experts, use_ue8m0=True)
    res = buf.low_latency_dispatch(xs[rank], topk[rank], M, num_experts, use_fp8=False)
    with pytest.raises(ValueError, match="use_logfmt=True and zero_copy=True are mutually exclusive"):
        buf.low_latency_combine(res[0], topk[rank], w[rank], res[2], use_logfmt=True, zero_copy=True)
    with pytest.raises(TypeError, match="handle must be the handle returned by Buffer.low_latency_dispatch"):
        buf.low_latency_combine(res[0], topk[rank], w[rank], ("not", "a", "handle"))
    hooked = buf.low_latency_dispatch(xs[rank], topk[rank], M, num_experts, return_recv_hook=True)
    with pytest.raises(ValueError, match="hook has not been called yet"):
        buf.low_latency_combine(res[0], topk[rank], w[rank], hooked[2])
    hooked[4]()
    _check_dispatch(rank, world, num_experts, xs, topk, res)  # the buffer still works


def _no_sync_path(rank, world, num_experts, xs, topk, w):
    """With the opt-out checks off, dispatch and combine never read a tensor on the host."""
    buf = _buffer(num_experts, check_consistency=False, validate=False)
    results = []
    with _no_host_sync():
        for use_fp8 in (True, False):
            results.append(buf.low_latency_dispatch(xs[rank], topk[rank], M, num_experts, use_fp8=use_fp8))
        y = _expert_outputs_no_sync(results[1][0], results[1][2])
        combined, _, hook = buf.low_latency_combine(y, topk[rank], w[rank], results[1][2],
                                                    return_recv_hook=True)
        hook()
    _check_dispatch(rank, world, num_experts, xs, topk, results[0], fp8=(False, False))
    _check_dispatch(rank, world, num_experts, xs, topk, results[1])
    _check_combine(rank, xs, topk, w, combined)


def _expert_outputs_no_sync(recv_x, handle):
    """Like :func:`_expert_outputs` with static shapes only (NaN past ``recv_count``)."""
    local = recv_x.size(0)
    scale = torch.tensor([_expert_scale(dist.get_rank() * local + lo) for lo in range(local)])
    y = (recv_x.float() * scale.view(-1, 1, 1)).to(torch.bfloat16)
    return torch.where((handle[0] >= 0).unsqueeze(-1), y, float("nan")).to(torch.bfloat16)


@pytest.mark.ranks
@pytest.mark.parametrize("world", [1, 2, 4])
def test_low_latency_against_oracle(world):
    assert run_local(_worker, world, timeout=240) == ["ok"] * world


@pytest.mark.ranks
def test_benchmark_runs_and_checks_itself(tmp_path, capsys):
    from flexep.cli.bench_ll import run_low_latency_bench

    path = tmp_path / "bench_ll.json"
    summary = run_low_latency_bench(world_size=2, tokens=(1, 8), hidden=256, num_topk=4, num_experts=8,
                                    iters=1, warmup=0, channels=(1, 2, "default"), normal=True, profile=True,
                                    json_path=str(path))
    assert path.exists() and set(summary["results"]) == {"1", "8"}
    for row in summary["results"].values():
        assert row["raw_ms"] > 0 and row["c1"]["ratio"] > 0 and row["c2"]["ll_ms"] > 0
        assert (row["c1"]["channels"], row["c2"]["channels"], row["cdefault"]["channels"]) == (1, 2, 1)
        assert 1.0 <= row["c1"]["bytes_ratio"] < 3.0  # LL pads to capacity; never below the minimum
        assert row["profile_ms"]["total"] > 0 and row["normal_ms"] > 0
    out = capsys.readouterr().out
    assert "raw both ways ms" in out and "where LL dispatch+combine spends its time" in out
    assert "          1  1* " in out and "* the Buffer's default" in out  # one machine: 1 channel
