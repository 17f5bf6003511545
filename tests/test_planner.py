"""Planner: byte counts against real flexep runs, the link and ECMP models on hand-checkable
cases, and the calibration against DeepEP's published tables.

Cheapest first: pure accounting and model arithmetic, then one 4-rank Gloo run, then the
calibration (a few seconds of sampling).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import flexep
from flexep.accounting import flows_traffic, routing_flows, routing_traffic
from flexep.launch import run_local
from flexep.planner import Routing
from flexep.planner.traffic import mode_loads
from flexep.planner.workload import ModelShape
from flexep.topology import Topology

# ---- accounting helper ---------------------------------------------------------------------


def _random_routings(gen, world, experts, k, tokens, holes=0.2):
    out = []
    for r in range(world):
        t = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens + r)])
        t[torch.rand(t.shape, generator=gen) < holes] = -1
        out.append(t)
    return out


@pytest.mark.parametrize("world,per_node,experts,k", [(4, 2, 8, 3), (8, 4, 16, 4), (6, 3, 12, 2),
                                                      (8, 8, 16, 4), (8, 1, 8, 2), (1, 1, 4, 2)])
def test_routing_flows_equals_routing_traffic(world, per_node, experts, k):
    gen = torch.Generator().manual_seed(world * 10 + per_node)
    topo = Topology(world, per_node)
    topk = _random_routings(gen, world, experts, k, 17)
    topk[-1] = topk[0]  # a repeated tensor object goes through the per-object memo
    flows = routing_flows(topk, experts, topo)
    for hierarchical in (False, True):
        want = routing_traffic(topk, experts, topo, 7, hierarchical)
        got = flows_traffic(flows, topo, 7, hierarchical)
        assert {c: got[c] for c in ("local", "intra", "inter")} == \
               {c: want[c] for c in ("local", "intra", "inter")}
        assert torch.equal(got["per_rank"], want["per_rank"])
    # Low latency: one message per valid (token, slot), to the expert's owner.
    local = experts // world
    for s, idx in enumerate(topk):
        valid = idx[idx >= 0]
        assert torch.equal(flows.selections[s], torch.bincount(valid // local, minlength=world))


def test_routing_flows_worked_example():
    topo = Topology(4, 2)
    empty = torch.empty(0, 2, dtype=torch.int64)
    f = routing_flows([torch.tensor([[2, 3]]), empty, empty, empty], 4, topo)
    assert f.flat[0].tolist() == [0, 0, 1, 1]
    assert f.hop1[0].tolist() == [0, 0, 1, 0] and f.hop2[2].tolist() == [0, 0, 0, 1]
    assert int(f.hop2.sum()) == 1 and f.selections[0].tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="one routing per rank"):
        routing_flows([empty], 4, topo)


# ---- real runs on Gloo ---------------------------------------------------------------------

HIDDEN, EXPERTS, TOPK, TOKENS = 256, 8, 3, 24
SHAPE = ModelShape(tokens_per_rank=TOKENS, hidden=HIDDEN, topk=TOPK, num_experts=EXPERTS,
                   dispatch_dtype="fp8", combine_dtype="bf16")
ROUTING = Routing("group_limited", groups=1, masked_slots=5)


def _sampled_topk() -> list[torch.Tensor]:
    return ROUTING.sample(4, 2, TOKENS, TOPK, EXPERTS, seed=3)


def _exchange(rank: int, world: int, hierarchical: bool) -> dict:
    """Dispatch (FP8, with top-k) and combine (BF16, with weights) the planner's routing."""
    group = dist.group.WORLD
    buf = flexep.Buffer(group, ranks_per_node=2, hierarchical=hierarchical)
    assert buf.hierarchical == hierarchical
    topk = _sampled_topk()[rank]
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(TOKENS, HIDDEN, generator=gen)
    x8 = x.to(torch.float8_e4m3fn)
    scales = torch.rand(TOKENS, HIDDEN // 128, generator=gen)
    w = torch.rand(topk.shape, generator=gen)
    lay = buf.get_dispatch_layout(topk, EXPERTS)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(
        (x8, scales), num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1],
        is_token_in_rank=lay[3], num_tokens_per_expert=lay[2], topk_idx=topk, topk_weights=w)
    sent = {"dispatch": dict(buf.last_traffic.payload)}
    buf.combine(recv_x[0].to(torch.bfloat16), handle, topk_weights=recv_w)
    sent["combine"] = dict(buf.last_traffic.payload)
    return sent


def _hier_available() -> bool:
    return os.path.exists(os.path.join(os.path.dirname(flexep.__file__), "hierarchical.py"))


@pytest.mark.parametrize("mode", ["flat", pytest.param("hierarchical", marks=pytest.mark.skipif(
    not _hier_available(), reason="flexep/hierarchical.py not present yet"))])
def test_predicted_bytes_equal_real_gloo_run(mode):
    world, topo = 4, Topology(4, 2)
    per_rank = run_local(_exchange, world, (mode == "hierarchical",), timeout=120)
    flows = routing_flows(_sampled_topk(), EXPERTS, topo)
    # Local copies are staged differently by the hierarchical path; links are what it times.
    classes = ("local", "intra", "inter") if mode == "flat" else ("intra", "inter")
    for phase in ("dispatch", "combine"):
        predicted = mode_loads(flows, topo, SHAPE, mode, phase, 1).link_bytes
        measured = {c: sum(per_rank[r][phase][c] for r in range(world)) for c in classes}
        assert measured == {c: predicted[c] for c in classes}, (mode, phase)
        assert measured["inter"] > 0
