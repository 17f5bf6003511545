"""Gradients through dispatch and combine, on Gloo ranks.

Each rank computes ``loss_r = <G_r, combine(dispatch(x) * scale(recv_w))>``. The gradients of
``sum_r loss_r`` are checked two ways in float64: against autograd through a single-process
re-implementation built from the oracle's routing, and against a central finite difference of
the global loss along a random direction (a gradcheck across ranks).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import flexep
from flexep.launch import run_local
from flexep.reference import ref_dispatch

pytestmark = pytest.mark.ranks

EXPERTS, HIDDEN, TOKENS, TOPK = 16, 8, 6, 3


def _inputs(rank: int):
    gen = torch.Generator().manual_seed(1234 + rank)
    topk = torch.rand(TOKENS, EXPERTS, generator=gen).topk(TOPK, 1).indices
    topk[0, -1] = -1
    x = torch.randn(TOKENS, HIDDEN, generator=gen, dtype=torch.float64)
    w = torch.rand(TOKENS, TOPK, generator=gen)
    g = torch.randn(TOKENS, HIDDEN, generator=gen, dtype=torch.float64)
    return topk, x, w, g


def _loss(buf, x, topk, w, g):
    recv_x, _, recv_w, _, handle = flexep.autograd.dispatch(buf, x, topk, w, EXPERTS)
    y = recv_x * (1.0 + recv_w.double().sum(1, keepdim=True))  # a differentiable "expert"
    return (flexep.autograd.combine(buf, y, handle) * g).sum()


def _worker(rank: int, world: int, ranks_per_node) -> dict:
    buf = flexep.Buffer(dist.group.WORLD, ranks_per_node=ranks_per_node)
    topk, x, w, g = _inputs(rank)
    x.requires_grad_(True)
    w.requires_grad_(True)
    _loss(buf, x, topk, w, g).backward()
    # Finite difference of the global loss along a random direction of all ranks' inputs.
    gen = torch.Generator().manual_seed(99 + rank)
    dx = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    dw = torch.randn(w.shape, generator=gen) * 1e-1
    eps = 1e-3
    with torch.no_grad():
        plus = _loss(buf, x + eps * dx, topk, w + eps * dw, g)
        minus = _loss(buf, x - eps * dx, topk, w - eps * dw, g)
    fd = torch.stack([(plus - minus) / (2 * eps)])
    dist.all_reduce(fd)
    analytic = torch.stack([(x.grad * dx).sum() + (w.grad.double() * dw.double()).sum()])
    dist.all_reduce(analytic)
    return dict(grad_x=x.grad, grad_w=w.grad, fd=float(fd), analytic=float(analytic))


def _reference_grads(world: int):
    """Autograd through the oracle's routing, all ranks in one process."""
    inputs = [_inputs(r) for r in range(world)]
    xs = [i[1].clone().requires_grad_(True) for i in inputs]
    ws = [i[2].clone().requires_grad_(True) for i in inputs]
    routes = ref_dispatch([i[1] for i in inputs], [i[0] for i in inputs], EXPERTS)
    local = EXPERTS // world
    loss = 0
    outs = [torch.zeros(TOKENS, HIDDEN, dtype=torch.float64) for _ in range(world)]
    for r in range(world):
        for s, t in routes[r].recv_src:
            ids = inputs[s][0][t]
            mask = (ids >= 0) & (torch.div(ids, local, rounding_mode="floor") == r)
            scale = 1.0 + (ws[s][t] * mask).double().sum()
            outs[s] = outs[s].index_add(0, torch.tensor([t]), (xs[s][t] * scale).unsqueeze(0))
    for s in range(world):
        loss = loss + (outs[s] * inputs[s][3]).sum()
    loss.backward()
    return [x.grad for x in xs], [w.grad for w in ws]


@pytest.mark.parametrize("world,ranks_per_node", [(1, None), (2, None), (4, 2)])
def test_gradients_match_reference_and_finite_differences(world, ranks_per_node):
    results = run_local(_worker, world, (ranks_per_node,), timeout=180)
    grad_x, grad_w = _reference_grads(world)
    for r in range(world):
        torch.testing.assert_close(results[r]["grad_x"], grad_x[r], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(results[r]["grad_w"].double(), grad_w[r].double(), rtol=1e-5,
                                   atol=1e-5)
    fd, analytic = results[0]["fd"], results[0]["analytic"]
    assert abs(fd - analytic) <= 1e-4 * max(1.0, abs(analytic)), (fd, analytic)
