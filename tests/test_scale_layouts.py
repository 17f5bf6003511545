"""FP8 scale tensors as callers build them: any number of columns (DeepEP moves them without
reading them: ``ceil(H/512)`` packed UE8M0 words when H is not a multiple of 512, finer blocks than
128) and any strides (column-major, TMA-padded, a single column whose "contiguous" strides are
not row-major). V1 ``Buffer.dispatch`` and V2 ``ElasticBuffer.dispatch`` (CPU-sync and sync-free,
compact and expanded) on 2 Gloo ranks; every received row's data and scales checked against the
sender's row, and the set of received rows against the routing."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import flexep
from flexep.launch import run_local

pytestmark = pytest.mark.ranks

T, E, K, WORLD = 6, 8, 2, 2

# name -> (hidden, scale dtype, columns, layout)
LAYOUTS = {
    "ue8m0_ceil_h512": (2688, torch.int32, 6, "colmajor"),
    "ue8m0_one_column_tma": (512, torch.int32, 1, "tma"),
    "fp32_one_column": (128, torch.float32, 1, "colmajor"),
    "fp32_blocks_of_32": (256, torch.float32, 8, "rowmajor"),
}


def _inputs(rank: int, layout: str):
    hidden, dtype, cols, order = LAYOUTS[layout]
    g = torch.Generator().manual_seed(7 + rank)
    data = torch.randn(T, hidden, generator=g).to(torch.float8_e4m3fn)
    # scale (t, j) names its row: rank * 1000 + t * 10 + j (exact in float32 and int32)
    values = (rank * 1000 + torch.arange(T)[:, None] * 10 + torch.arange(cols)).to(dtype)
    if order == "colmajor":
        scales = values.t().contiguous().t()
    elif order == "tma":  # column-major with the token dimension padded to 8
        scales = torch.zeros(cols, 8, dtype=dtype)[:, :T].t()
        scales.copy_(values)
    else:
        scales = values
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return data, scales, idx


def _expected_rows(rank: int, layout: str) -> list:
    """(source rank, token) of every token routed to ``rank`` (at least one of its experts)."""
    local = E // WORLD
    rows = []
    for src in range(WORLD):
        idx = _inputs(src, layout)[2]
        rows += [(src, t) for t in range(T) if ((idx[t] // local) == rank).any()]
    return sorted(rows)


def _check_rows(rank: int, layout: str, data: torch.Tensor, scales: torch.Tensor) -> list:
    """Each received row's scales name a sender row, whose data and scales it carries exactly."""
    found = []
    for i in range(data.size(0)):
        code = int(scales[i, 0])
        src, t = code // 1000, code % 1000 // 10
        want_data, want_scales, _ = _inputs(src, layout)
        assert torch.equal(scales[i], want_scales[t]), (layout, i, scales[i], want_scales[t])
        assert torch.equal(data[i].view(torch.uint8), want_data[t].view(torch.uint8)), (layout, i)
        found.append((src, t))
    return found


def _run(rank: int, world: int, layout: str) -> dict:
    data, scales, idx = _inputs(rank, layout)
    hidden = data.size(1)
    weights = torch.rand(T, K)
    expected = _expected_rows(rank, layout)
    out = {}

    buf = flexep.Buffer(dist.group.WORLD, int(1e8), 0)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    (recv, recv_scales), *_ = buf.dispatch((data, scales), topk_idx=idx, topk_weights=weights,
                                           num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                                           is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    out["v1"] = sorted(_check_rows(rank, layout, recv, recv_scales)) == expected

    v2 = flexep.ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=T, hidden=hidden, num_topk=K,
                              use_fp8_dispatch=True)
    for sync, expand in ((True, False), (True, True), (False, True), (False, False)):
        (recv, recv_scales), _, _, handle, _ = v2.dispatch(
            (data, scales), topk_idx=idx, topk_weights=weights, num_experts=E, do_cpu_sync=sync,
            do_expand=expand)
        valid = int(handle.psum_num_recv_tokens_per_expert[-1]) if expand else \
            int(handle.psum_num_recv_tokens_per_scaleup_rank[-1])
        rows = _check_rows(rank, layout, recv[:valid], recv_scales[:valid])
        # expanded: one row per (token, local expert); compact: one per token
        out[f"v2 sync={sync} expand={expand}"] = sorted(set(rows)) == expected and \
            (expand or len(rows) == len(expected))
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_scale_layouts(layout):
    for rank, result in enumerate(run_local(_run, WORLD, (layout,), timeout=180)):
        assert all(result.values()), (rank, result)
