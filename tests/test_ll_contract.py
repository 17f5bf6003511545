"""Low-latency contract details: buffer reuse, the owner's arithmetic, checks that ride in the
payload (one exchange per dispatch, two per combine, errors on every rank).

The pool and the reduction run in-process; the rest on two Gloo ranks against the oracle.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import flexep
from flexep.algorithms import ll_reduce
from flexep.algorithms.ll_wire import eager_host
from flexep.comm.pool import BufferPool
from flexep.errors import CommTimeoutError, RankMismatchError
from flexep.launch import run_local
from flexep.reference import ref_ll_dispatch


# ---- the pool -----------------------------------------------------------------------------------
def test_pool_reuses_a_buffer_only_once_released():
    pool = BufferPool(depth=2)
    a = pool.get("x", (4, 8), torch.float32, torch.device("cpu"))
    ptr = a.data_ptr()
    b = pool.get("x", (4, 8), torch.float32, torch.device("cpu"))
    assert b.data_ptr() != ptr  # a is alive
    view = a[1:].view(torch.int32)
    del a
    c = pool.get("x", (4, 8), torch.float32, torch.device("cpu"))
    assert c.data_ptr() not in (ptr, b.data_ptr())  # a's view still holds the storage; depth 2 is full
    del view, c
    d = pool.get("x", (2, 8), torch.bfloat16, torch.device("cpu"))
    assert d.data_ptr() == ptr and d.shape == (2, 8) and d.dtype == torch.bfloat16
    del b, d
    big = pool.get("x", (64, 64), torch.float32, torch.device("cpu"))  # too small: one is replaced
    assert big.shape == (64, 64) and pool.nbytes >= 64 * 64 * 4
    other = pool.get("y", (4, 8), torch.float32, torch.device("cpu"))  # names never share
    assert other.data_ptr() != big.data_ptr()


# ---- the owner's arithmetic ---------------------------------------------------------------------
def _fma_reference(x, slot, w):
    """Plain loops: ``acc = fma(w, x, acc)`` in float32 (the product and sum exact in float64,
    one rounding), k in order over the local pairs, then one rounding to ``x``'s dtype."""
    num_local, rows, hidden = x.shape
    table = x.reshape(-1, hidden).double()
    out = torch.empty(rows, hidden, dtype=x.dtype)
    for i in range(rows):
        acc = torch.zeros(hidden, dtype=torch.float32)
        for k in range(slot.size(1)):
            if slot[i, k] < num_local * rows:
                acc = (table[slot[i, k]] * float(w[i, k]) + acc.double()).float()
        out[i] = acc.to(x.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_owner_reduce_host_path_is_the_dense_arithmetic(dtype):
    g = torch.Generator().manual_seed(3)
    # (the host path works in steps of about 128 local pairs: the last cases take several, and
    # rows with no local pair, or no local pair at all)
    for num_local, rows, hidden, topk, share in ((4, 12, 64, 3, 0.5), (3, 7, 5, 2, 0.5), (2, 1, 128, 1, 0.5),
                                                 (8, 40, 96, 8, 0.5), (4, 150, 16, 8, 0.3),
                                                 (2, 64, 8, 8, 1.0), (2, 9, 8, 4, 0.0)):
        x = torch.randn(num_local, rows, hidden, generator=g).to(dtype)
        x.view(-1)[::5] = float("nan")  # unused slots may hold anything
        local = torch.rand(rows, topk, generator=g) < share
        slot = torch.where(local, torch.randint(0, num_local * rows, (rows, topk), generator=g),
                           num_local * rows)
        used = torch.randn(int(local.sum()), hidden, generator=g).to(dtype)
        x.view(num_local * rows, hidden)[slot[local]] = used
        w = torch.rand(rows, topk, generator=g)
        pool = BufferPool()
        assert eager_host(x)  # so reduce_owner takes the host path
        host = ll_reduce.reduce_owner(x, slot, w, pool.get).clone()
        dense = ll_reduce.reduce_owner_dense(x, slot, w, pool.get, torch.empty(rows, hidden, dtype=dtype))
        assert torch.equal(host, dense)
        assert torch.equal(host, _fma_reference(x, slot, w)), (num_local, rows, hidden, topk, share)


def test_host_path_only_in_plain_eager_host_execution():
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = torch.zeros(2)
    assert eager_host(t)
    with FakeTensorMode():  # data-dependent sizes would fail there: the static path is used
        assert not eager_host(torch.zeros(2))
    assert not eager_host(torch.zeros(2, device="meta"))
    assert torch.compile(lambda a: a + eager_host(a), fullgraph=True, backend="eager")(t).tolist() == [0, 0]


# ---- on two ranks -------------------------------------------------------------------------------
M, H, K, E = 8, 256, 4, 8


def _inputs(rank: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(M, H, generator=g) * 0.5).to(torch.bfloat16) for _ in range(2)]
    topk = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(M)]) for _ in range(2)]
    return xs, topk, torch.rand(M, K, generator=g)


def _valid_rows(recv_x, count) -> list:
    return [recv_x[lo, :int(count[lo])].clone() for lo in range(count.numel())]


def _worker(rank: int, world: int) -> dict:
    out = {}
    hint = flexep.Buffer.get_low_latency_rdma_size_hint(2 * M, H, world, E)
    buf = flexep.Buffer(dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True)
    xs, topk, w = _inputs(rank, 0)
    # A decode loop (each step's results replaced by the next step's) alternates between two
    # buffers; a result held on the side stays intact while later calls run.
    ptrs, exchanges = [], []
    for _ in range(4):
        recv_x, count, handle, _, _ = buf.low_latency_dispatch(xs[rank], topk[rank], M, E, use_fp8=False)
        exchanges.append(buf.last_traffic.messages)
        ptrs.append(recv_x.data_ptr())
        buf.low_latency_combine(recv_x, topk[rank], w, handle)
        exchanges.append(buf.last_traffic.messages)
    out["ptrs"], out["exchanges"] = ptrs, exchanges
    held = buf.low_latency_dispatch(xs[rank], topk[rank], M, E, use_fp8=False)
    snapshot = _valid_rows(held[0], held[1])
    for _ in range(3):
        buf.low_latency_dispatch(xs[rank], topk[rank], M, E, use_fp8=False)
    out["held_intact"] = all(torch.equal(a, b) for a, b in zip(snapshot, _valid_rows(held[0], held[1])))
    out["held_rows"] = [r.float() for r in snapshot]
    # After the frames are pinned: a capacity disagreement raises on both ranks, named, and the
    # Buffer keeps working.
    cap = 2 * M if rank == 1 else M
    try:
        buf.low_latency_dispatch(xs[rank], topk[rank], cap, E, use_fp8=False)
        out["mismatch"] = "returned"
    except RankMismatchError as exc:
        out["mismatch"] = str(exc)
    res = buf.low_latency_dispatch(xs[rank], topk[rank], M, E, use_fp8=True)
    out["after"] = res[1].tolist()
    # Ranks making different calls (rank 0 dispatches, rank 1 combines) meet on different
    # groups: both end at the deadline instead of aborting on mismatched sizes.
    short = flexep.Buffer(dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True, timeout=3)
    recv_x, _, handle, _, _ = short.low_latency_dispatch(xs[rank], topk[rank], M, E, use_fp8=False)
    short.low_latency_dispatch(xs[rank], topk[rank], M, E, use_fp8=False)  # pinned
    try:
        if rank == 0:
            short.low_latency_dispatch(xs[rank], topk[rank], M, E, use_fp8=False)
        else:
            short.low_latency_combine(recv_x, topk[rank], w, handle)
        out["order"] = "returned"
    except CommTimeoutError as exc:
        out["order"] = type(exc).__name__
    return out


@pytest.mark.timeout(200)
def test_buffers_checks_and_exchanges_on_two_ranks():
    results = run_local(_worker, 2, timeout=180)
    xs, topk, _ = _inputs(0, 0)
    ref = ref_ll_dispatch(xs, topk, E)
    for rank, res in enumerate(results):
        ptrs = res["ptrs"]
        assert ptrs[0] == ptrs[2] and ptrs[1] == ptrs[3] and ptrs[0] != ptrs[1], ptrs
        # The first dispatch and combine agree in a control round and pin their frames; then one
        # exchange per dispatch, two per combine (weights, rows): no control round per call.
        assert res["exchanges"] == [2, 3] + [1, 2] * 3
        assert res["held_intact"]
        for lo, rows in enumerate(res["held_rows"]):
            want = sorted(tuple(r[:4].tolist()) for r in ref[rank]["rows"][lo])
            assert sorted(tuple(r[:4].tolist()) for r in rows) == [tuple(float(v) for v in t) for t in want]
        assert "ranks disagree on capacity" in res["mismatch"] and "rank 1: 16" in res["mismatch"]
        assert res["after"] == ref[rank]["count"]
        assert res["order"] == "CommTimeoutError"
