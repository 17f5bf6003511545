"""Frameworks' own DeepEP callers, unmodified, on flexep through the ``deep_ep`` shim: Megatron-Core's
``fused_a2a`` (V1 ``Buffer``: layout, dispatch, combine, and their autograd duals, with and without
``async_finish``) and torchtitan's ``distributed/deepep`` (V2 ``ElasticBuffer``: the compact
training path with gradients and the expand inference path). Each result is compared with a
reference computed from the inputs alone. Skipped, with the install command, where the framework
(at the version these callers were read from) is not installed."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from flexep.cli.baselines import megatron_a2a, torchtitan_a2a
from flexep.cli.baselines.availability import check_installed
from flexep.launch import run_local

pytestmark = pytest.mark.ranks

SHIM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shims", "deep_ep")
T, H, E = 12, 64, 8


def _require(framework) -> None:
    ok, why = check_installed(framework)
    if not ok:
        pytest.skip(f"{why}; install with `{framework.install}`")


def _inputs(rank: int, k: int):
    """Rank ``rank``'s tokens and routing (any rank can rebuild any other's)."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    w, idx = torch.randn(T, E, generator=g).softmax(-1).topk(k, dim=-1)
    return x, idx, w.float()


def _tokens_per_expert(rank: int, world: int, k: int) -> list:
    """Global tokens that chose each of ``rank``'s experts."""
    local = E // world
    chosen = torch.cat([_inputs(r, k)[1].flatten() for r in range(world)])
    return torch.bincount(chosen, minlength=E)[rank * local:(rank + 1) * local].tolist()


def _megatron(rank: int, world: int, async_finish: bool) -> dict:
    sys.path.insert(0, SHIM)
    megatron_a2a.import_framework()  # its import shim (paged_stash's top-level triton import)
    import torch.distributed as dist
    from megatron.core.transformer.moe import fused_a2a

    x, idx, w = _inputs(rank, 2)
    x.requires_grad_(True)
    w.requires_grad_(True)
    flags = dict(async_finish=async_finish, allocate_on_comm_stream=async_finish)
    recv_x, _, recv_w, tokens_per_expert, handle = fused_a2a.fused_dispatch(
        x, idx, w, E, dist.group.WORLD, **flags)
    # each rank's "experts" scale what it received by (rank + 1); combine sums over the ranks
    out, _ = fused_a2a.fused_combine((recv_x.float() * (rank + 1)).to(torch.bfloat16),
                                     dist.group.WORLD, handle, **flags)
    (out.float() * torch.arange(H)).sum().backward()
    dest = [sorted({int(e) // (E // world) for e in row}) for row in idx]
    factor = torch.tensor([float(sum(r + 1 for r in d)) for d in dest])[:, None]
    return dict(out=out.float(), ref=x.detach().float() * factor,
                grad=x.grad.float(), grad_ref=(factor * torch.arange(H)).to(torch.bfloat16).float(),
                counts=tokens_per_expert.tolist(), counts_ref=_tokens_per_expert(rank, world, 2),
                recv_w_rows=recv_w.size(0), recv_rows=recv_x.size(0))


def _torchtitan(rank: int, world: int, expand: bool) -> dict:
    sys.path.insert(0, SHIM)
    import torch.distributed as dist
    from torchtitan.distributed.deepep import deepep

    # torchtitan registers its two custom ops for CUDA only; the same functions serve CPU tensors
    torch.library.impl(deepep._lib, "dispatch", "CPU")(deepep._dispatch_op_impl)
    torch.library.impl(deepep._lib, "combine", "CPU")(deepep._combine_op_impl)
    k, local = 3, E // world
    x, idx, w = _inputs(rank, k)
    x.requires_grad_(not expand)
    w.requires_grad_(not expand)
    deepep.get_buffer(dist.group.WORLD, hidden=H, num_max_tokens_per_rank=T, num_topk=k)
    scale = torch.arange(1, E + 1, dtype=torch.float32)  # expert e multiplies its rows by e + 1
    with torch.set_grad_enabled(not expand):
        routed, per_expert, state = deepep.dispatch_tokens(x, idx, w, local, E, num_tokens_per_rank=T,
                                                           cudagraphable=expand)
        counts = per_expert.tolist()
        n = sum(counts)
        expert = rank * local + torch.repeat_interleave(torch.arange(local), torch.tensor(counts))
        y = torch.cat([(routed[:n].float() * scale[expert][:, None]).to(routed.dtype), routed[n:]])
        out = deepep.combine_tokens(y, state)
        deepep.sync_combine()
    s = scale[idx]  # [T, k]
    res = dict(out=out.float(), ref=(w.detach() * s).sum(1, keepdim=True) * x.detach().float(),
               counts=counts, counts_ref=_tokens_per_expert(rank, world, k))
    if not expand:
        (out.float() * torch.arange(H)).sum().backward()
        res.update(grad=x.grad.float(), grad_ref=(w.detach() * s).sum(1, keepdim=True) * torch.arange(H),
                   w_grad=w.grad, w_grad_ref=s * (x.detach().float() * torch.arange(H)).sum(1, keepdim=True))
    return res


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 0.02) -> bool:
    return (a - b).abs().max().item() <= rtol * b.abs().max().item()


@pytest.mark.parametrize("async_finish", [False, True])
def test_megatron_fused_a2a(async_finish):
    _require(megatron_a2a.FRAMEWORK)
    for rank, r in enumerate(run_local(_megatron, 2, (async_finish,), timeout=180)):
        assert r["counts"] == r["counts_ref"], rank
        assert _close(r["out"], r["ref"]) and _close(r["grad"], r["grad_ref"]), rank
        assert r["recv_w_rows"] == r["recv_rows"]


@pytest.mark.parametrize("expand", [False, True], ids=["compact-training", "expand-inference"])
def test_torchtitan_deepep_v2(expand):
    _require(torchtitan_a2a.FRAMEWORK)
    for rank, r in enumerate(run_local(_torchtitan, 2, (expand,), timeout=180)):
        assert r["counts"] == r["counts_ref"], rank
        assert _close(r["out"], r["ref"]), rank
        if not expand:
            assert _close(r["grad"], r["grad_ref"]) and _close(r["w_grad"], r["w_grad_ref"]), rank
