"""Planner: byte counts against real flexep runs, the time model and the ECMP model on
hand-checkable cases, hardware/profile formats, the CLI.

Cheapest first: pure accounting and model arithmetic, then one 4-rank Gloo run, then small
predictions. The calibration and the held-out test live in ``test_planner_calibration.py``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

import flexep
from flexep.accounting import flows_traffic, routing_flows, routing_traffic
from flexep.launch import run_local
from flexep.planner import (
    Accelerator,
    Fabric,
    Hardware,
    ModelShape,
    Nic,
    Profile,
    Routing,
    ScaleUp,
    get_preset,
    get_profile,
    predict,
    preset_names,
    profile_names,
)
from flexep.planner import cli as planner_cli
from flexep.planner.ecmp import _balanced_bytes, _max_link_load, fabric_time_us, leaf_of
from flexep.planner.fit import nelder_mead
from flexep.planner.model import PhaseTime, Term, us, v2_num_sms
from flexep.planner.routing import _group_limited, group_limited_reference
from flexep.planner.traffic import mode_loads
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


def _exchange(rank: int, world: int, modes: tuple) -> dict:
    """Dispatch (FP8, with top-k) and combine (BF16, with weights) the planner's routing with a
    flat and (when available) a hierarchical ``Buffer``; payload bytes per call."""
    group = dist.group.WORLD
    topk = _sampled_topk()[rank]
    gen = torch.Generator().manual_seed(rank)
    x8 = torch.randn(TOKENS, HIDDEN, generator=gen).to(torch.float8_e4m3fn)
    scales = torch.rand(TOKENS, HIDDEN // 128, generator=gen)
    w = torch.rand(topk.shape, generator=gen)
    sent = {}
    for mode in modes:
        buf = flexep.Buffer(group, ranks_per_node=2, hierarchical=mode == "hierarchical")
        assert buf.hierarchical == (mode == "hierarchical")
        lay = buf.get_dispatch_layout(topk, EXPERTS)
        recv_x, _, recv_w, _, handle, _ = buf.dispatch(
            (x8, scales), num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1],
            is_token_in_rank=lay[3], num_tokens_per_expert=lay[2], topk_idx=topk, topk_weights=w)
        sent[mode, "dispatch"] = dict(buf.last_traffic.payload)
        buf.combine(recv_x[0].to(torch.bfloat16), handle, topk_weights=recv_w)
        sent[mode, "combine"] = dict(buf.last_traffic.payload)
    return sent


def _hier_available() -> bool:
    # The hierarchical algorithm landed separately; compare it as soon as it exists.
    return os.path.exists(os.path.join(os.path.dirname(flexep.__file__), "hierarchical.py"))


@pytest.mark.ranks
def test_predicted_bytes_equal_real_gloo_run():
    world, topo = 4, Topology(4, 2)
    modes = ("flat", "hierarchical") if _hier_available() else ("flat",)
    per_rank = run_local(_exchange, world, (modes,), timeout=180)
    flows = routing_flows(_sampled_topk(), EXPERTS, topo)
    for mode in modes:
        # Local copies are staged differently by the hierarchical path; links are what it times.
        classes = ("local", "intra", "inter") if mode == "flat" else ("intra", "inter")
        for phase in ("dispatch", "combine"):
            predicted = mode_loads(flows, topo, SHAPE, mode, phase, 1).link_bytes
            measured = {c: sum(per_rank[r][mode, phase][c] for r in range(world)) for c in classes}
            assert measured == {c: predicted[c] for c in classes}, (mode, phase)
            assert measured["inter"] > 0 and measured["intra"] > 0


# ---- time model ----------------------------------------------------------------------------


def test_phase_time_docstring_example():
    # Two overlapped terms of 40 and 25 us and a 20 us launch: 60 us, a third of it fixed.
    t = PhaseTime(60.0, (Term("nic_recv", "bandwidth", 40.0, True), Term("sm_push", "sm", 25.0, True),
                         Term("launch", "fixed", 20.0, False)))
    assert t.bottleneck == "nic_recv" and t.fixed_us == pytest.approx(20.0)
    assert t.shares() == pytest.approx({"bandwidth": 2 / 3, "fixed": 1 / 3})
    assert t.why() == "bandwidth 67% (nic_recv), fixed 33% (launch)"
    assert us(1e3, 1.0) == pytest.approx(1.0)


def test_v2_sm_count_docstring_example():
    # 300 MB over a 500 us link at 25 GB/s per SM: 24 SMs, 30 with headroom; at least 4, at most
    # the GPU's.
    assert v2_num_sms(300e6, 500.0, 25.0, 132) == 30
    assert v2_num_sms(1e3, 500.0, 25.0, 132) == 4
    assert v2_num_sms(300e6, 5.0, 25.0, 132) == 132


def _toy_hardware(**nic) -> Hardware:
    """Round numbers: NIC 1 GB/s, scale-up 2 GB/s, 2 GPUs per domain."""
    return Hardware(name="toy", description="toy", gpus_per_node=2,
                    gpu=Accelerator("toy", sms=8, hbm_gbs=100.0),
                    scale_up=ScaleUp("link", bandwidth_gbs=2.0, latency_us=2.0, domain_size=2),
                    nic=Nic("nic", port_gbps=8.0, latency_us=1.0, **nic),
                    fabric=Fabric(hosts_per_leaf=32, uplinks_per_leaf=4, uplink_gbps=8.0))


def _toy_profile(**kw) -> Profile:
    """Full line rate, free copies, launch 10 us (5 in low latency), 0.5 us per peer and message."""
    base = dict(name="toy", description="toy", family="deepep_v1", scaleup_efficiency=1.0,
                rdma_efficiency=1.0, sms=2, sm_copy_gbs=1e6, sm_forward_gbs=1e6, launch_us=10.0,
                peer_us=0.5, ll_launch_us=5.0, ll_message_us=0.5, ll_token_us=0.0)
    return Profile(**{**base, **kw})


TOY_ROUTING = Routing("recorded", recorded=torch.tensor([[[2, 3]], [[-1, -1]], [[-1, -1]], [[-1, -1]]]))
TOY_SHAPE = ModelShape(tokens_per_rank=1, hidden=1000, topk=2, num_experts=4, dispatch_dtype="bf16")


def test_predicted_times_on_a_hand_checked_toy():
    # W = 4, two domains of 2: rank 0 has one token for experts 2 and 3 (ranks 2 and 3, domain 1).
    rb, msg = TOY_SHAPE.dispatch_row_bytes(), TOY_SHAPE.ll_dispatch_message_bytes()
    assert (rb, msg) == (2000 + 24 + 4, 2000 + 16)
    preds = {(p.mode, p.phase): p for p in
             predict(_toy_hardware(), TOY_SHAPE, TOY_ROUTING, 4, profile=_toy_profile())}
    # Flat: rank 0 sends 2 rows over its NIC (1 GB/s = 1000 B/us) to 2 peers (0.5 us each);
    # launch 10 + network latency 1.
    flat = preds["flat", "dispatch"]
    assert flat.time_us == pytest.approx(10 + 1 + 2 * 0.5 + 2 * rb / 1e3)
    # The 10 us launch outweighs the 4 us transfer here, so it is named the bottleneck.
    assert flat.bottleneck == "launch" and flat.sms == 2
    assert flat.why.startswith("fixed 69% (launch), bandwidth 25% (nic_send)")
    # Hierarchical: 1 row over the NIC to rank 2, which forwards 1 row to rank 3 over the
    # scale-up link (2 GB/s); one peer on each link; both hop latencies. Slowest: the NIC.
    hier = preds["hierarchical", "dispatch"]
    assert hier.time_us == pytest.approx(10 + (1 + 2) + 2 * 0.5 + rb / 1e3)
    assert hier.terms_us["scaleup_send"] == pytest.approx(rb / 2e3)
    # Low latency: one message per (token, expert): 2 over the NIC; issuing them (2 x 0.5 us)
    # overlaps the transfer; launch 5 + latency 1.
    ll = preds["low_latency", "dispatch"]
    assert ll.time_us == pytest.approx(5 + 1 + 2 * msg / 1e3)
    assert ll.terms_us["gpu_issue"] == pytest.approx(1.0)
    # Combine returns the same rows: rank 0 now receives both.
    assert max(preds["flat", "combine"].terms_us, key=preds["flat", "combine"].terms_us.get) == "launch"
    assert "nic_recv" in preds["flat", "combine"].why
    assert preds["flat", "combine"].time_us == pytest.approx(12 + 2 * TOY_SHAPE.combine_row_bytes() / 1e3)
    # Shares add up to the whole time.
    assert sum(flat.shares.values()) == pytest.approx(1.0)


def test_toy_sm_budget_proxy_and_unordered_fabric():
    # SMs: 1 SM per role at 0.25 GB/s (250 B/us). Rank 0 stages 1 row; rank 2 (the entry)
    # copies the row it keeps and forwards 1 to rank 3: 2 rows, the slowest role.
    rb = TOY_SHAPE.dispatch_row_bytes()
    slow = _toy_profile(sm_forward_gbs=0.25)
    hier = [p for p in predict(_toy_hardware(), TOY_SHAPE, TOY_ROUTING, 4, ("hierarchical",), profile=slow)
            if p.phase == "dispatch"][0]
    assert hier.terms_us["sm_stage_recv"] == pytest.approx(rb / 250)
    assert hier.bottleneck == "sm_forward" and hier.time_us == pytest.approx(14 + 2 * rb / 250)
    assert hier.why.startswith("sm ")
    # A CPU proxy posts the 2 low-latency messages and the count signals of the experts in the
    # other domain (2 of 4): 4 x 1 us / 2 threads; the hand-off adds 3 us.
    msg = TOY_SHAPE.ll_dispatch_message_bytes()
    hw = _toy_hardware(initiator="proxy", proxy_threads=2, proxy_latency_us=3.0)
    prof = _toy_profile(proxy_message_us=1.0)
    ll = [p for p in predict(hw, TOY_SHAPE, TOY_ROUTING, 4, ("low_latency",), profile=prof)
          if p.phase == "dispatch"][0]
    assert ll.terms_us["proxy_post"] == pytest.approx(4 * 1.0 / 2)
    assert ll.time_us == pytest.approx(5 + 1 + 3 + 2 * msg / 1e3)
    # Unordered fabric: the receiver's proxy handles every signal too (2 + 2 x 2 posts, 3 us)
    # and the sender waits one round trip (2 x 1 us) before signalling.
    hw = Hardware(**{**hw.__dict__, "fabric": Fabric(ordered=False, routing="spray")})
    ll = [p for p in predict(hw, TOY_SHAPE, TOY_ROUTING, 4, ("low_latency",), profile=prof)
          if p.phase == "dispatch"][0]
    assert ll.terms_us["proxy_post"] == pytest.approx(3.0)
    assert ll.time_us == pytest.approx(5 + 1 + 3 + 2 + max(2 * msg / 1e3, 3.0))


def test_flexep_profile_adds_host_read_and_passes():
    prof = get_profile("flexep_nccl")
    assert prof.family == "flexep" and not prof.calibrated and prof.ll_capacity
    preds = {(p.mode, p.phase): p for p in
             predict(_toy_hardware(), TOY_SHAPE, TOY_ROUTING, 4, profile=prof)}
    d, c = preds["flat", "dispatch"], preds["flat", "combine"]
    assert d.terms_us["host_read"] == pytest.approx(prof.host_sync_us) and "host_read" not in c.terms_us
    # Hierarchical runs its two all-to-alls one after the other, each with its own launch.
    h = preds["hierarchical", "dispatch"]
    assert h.terms_us["launch"] == pytest.approx(2 * prof.launch_us)
    assert h.terms_us["network_a2a"] > 0 and h.terms_us["forward_a2a"] > 0
    # Fixed capacity: every peer gets tokens_per_rank (1) rows whatever the routing: 2 peers
    # in the other domain.
    ll = preds["low_latency", "dispatch"]
    row = TOY_SHAPE.ll_capacity_row_bytes(False)
    assert row == 2016  # data 2000 + source index 4 + 2 int32 ids = 2012, padded to 16
    assert ll.bytes_per_rank["nic"] == pytest.approx(2 * row)


# ---- ECMP ------------------------------------------------------------------------------------


def _two_leaf_flows():
    """4 single-rank nodes, 2 per leaf: flows 0->2 (1 MB) and 1->3 (2 MB) cross the spine,
    0->1 (5 MB) stays under leaf 0."""
    f = torch.zeros(4, 4)
    f[0, 2], f[1, 3], f[0, 1] = 1e6, 2e6, 5e6
    return f, Topology(4, 1)


@pytest.mark.parametrize("routing", ["ecmp", "adaptive"])
@pytest.mark.parametrize("channels", [1, 3])
def test_ecmp_one_path_all_flows_share_it(routing, channels):
    flows, topo = _two_leaf_flows()
    fabric = Fabric(kind="roce", routing=routing, hosts_per_leaf=2, uplinks_per_leaf=1,
                    uplink_gbps=8.0, rail_optimized=False)
    t = fabric_time_us(flows, topo, fabric, channels, samples=5)
    assert t.mean_us == pytest.approx(3e6 / 1e3) and t.max_us == pytest.approx(t.mean_us)
    assert t.cross_flows == 2


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_ecmp_many_paths_no_collisions(channels):
    flows, topo = _two_leaf_flows()
    fabric = Fabric(kind="roce", routing="ecmp", hosts_per_leaf=2, uplinks_per_leaf=10 ** 7,
                    uplink_gbps=8.0, rail_optimized=False)
    t = fabric_time_us(flows, topo, fabric, channels, samples=20)
    # Every subflow alone on its path: the largest subflow sets the time.
    assert t.max_us == pytest.approx(2e6 / channels / 1e3)


def test_ecmp_collisions_spread_by_channels_adaptive_routing_does_not_collide():
    # 8 equal flows leave leaf 0 over 8 paths. One queue pair per peer: two flows on one
    # path are likely; more channels per peer average the hashing out.
    topo = Topology(16, 1)
    flows = torch.zeros(16, 16)
    flows[torch.arange(8), torch.arange(8) + 8] = 1e6
    ecmp = Fabric(kind="roce", routing="ecmp", hosts_per_leaf=8, uplinks_per_leaf=8,
                  uplink_gbps=8.0, rail_optimized=False)
    ideal = 1e6 / 1e3  # one flow's bytes on one 1 GB/s link
    slow = [fabric_time_us(flows, topo, ecmp, c, samples=400).mean_us / ideal for c in (1, 4, 16)]
    assert slow[0] > 2.0 and slow[0] > slow[1] > slow[2] and slow[2] < 1.4
    adaptive = Fabric(kind="infiniband", routing="adaptive", hosts_per_leaf=8, uplinks_per_leaf=8,
                      uplink_gbps=8.0, rail_optimized=False)
    assert fabric_time_us(flows, topo, adaptive, 1).mean_us == pytest.approx(ideal)


def test_ecmp_two_flows_two_paths_expectation():
    # Two equal flows on two paths collide with probability 1/2: E[max load] = 1.5 flows.
    topo = Topology(4, 1)
    flows = torch.zeros(4, 4)
    flows[0, 2] = flows[1, 3] = 1e6
    fabric = Fabric(kind="roce", routing="ecmp", hosts_per_leaf=2, uplinks_per_leaf=2,
                    uplink_gbps=8.0, rail_optimized=False)
    assert fabric_time_us(flows, topo, fabric, 1, samples=4000).mean_us / 1e3 == pytest.approx(1.5, abs=0.05)


def test_ecmp_balanced_channels_spread_a_pair_over_its_paths():
    # One 1 MB pair, 3 subflows on 2 paths. Even bytes per subflow: all 3 on one path
    # (probability 1/4) -> 1 MB, else 2/3 MB: E = 0.75 MB. Balanced over the distinct paths:
    # 1 MB or 1/2 MB: E = 0.625 MB.
    topo = Topology(4, 1)
    flows = torch.zeros(4, 4)
    flows[0, 2] = 1e6
    fabric = Fabric(kind="roce", routing="ecmp", hosts_per_leaf=2, uplinks_per_leaf=2,
                    uplink_gbps=8.0, rail_optimized=False)
    even = fabric_time_us(flows, topo, fabric, 3, samples=4000).mean_us / 1e3
    balanced = fabric_time_us(flows, topo, fabric, 3, samples=4000, balanced=True).mean_us / 1e3
    assert even == pytest.approx(0.75, abs=0.03) and balanced == pytest.approx(0.625, abs=0.03)
    # One channel: nothing to balance.
    assert fabric_time_us(flows, topo, fabric, 1, samples=50, balanced=True).mean_us == \
        fabric_time_us(flows, topo, fabric, 1, samples=50).mean_us
    # The bytes of each draw: a path's share on the pair's first subflow there.
    assert _balanced_bytes(torch.tensor([[0, 0, 1]]), torch.tensor([12.0]), 3).tolist() == [[6.0, 0.0, 6.0]]


def test_leaf_placement():
    topo = Topology(32, 8)
    rail = leaf_of(topo, Fabric(hosts_per_leaf=2))
    assert rail[:10].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1] and int(rail[16]) == 8
    tor = leaf_of(topo, Fabric(hosts_per_leaf=16, rail_optimized=False))
    assert tor.tolist() == [0] * 16 + [1] * 16


@pytest.mark.slow
def test_more_channels_help_roce_not_infiniband():
    # Hierarchical EP64 on top-of-rack RoCE: rail flows between leaves, one per peer node,
    # collide on spine paths; channels per peer spread them. Adaptive IB never collides.
    shape = ModelShape(tokens_per_rank=512)
    slow = {}
    for name in ("h800_ib", "h800_roce_tor"):
        preds = predict(get_preset(name), shape, Routing("group_limited"), 64, modes=("hierarchical",),
                        channels=(1, 8))
        slow[name] = {p.channels: p.ecmp_slowdown for p in preds if p.phase == "dispatch"}
    assert slow["h800_ib"] == {1: 1.0, 8: 1.0}
    assert slow["h800_roce_tor"][1] > 1.1 and slow["h800_roce_tor"][8] < slow["h800_roce_tor"][1]


# ---- routings, hardware, presets -------------------------------------------------------------


def test_fast_group_limited_sampler_matches_deepep_procedure():
    n, experts, nodes, groups = 20000, 256, 8, 4
    fast = _group_limited(n, 8, experts, nodes, groups, torch.Generator().manual_seed(1))
    ref = group_limited_reference(n, 8, experts, nodes, groups, torch.Generator().manual_seed(2))
    per = experts // nodes

    def stats(x):
        hit = torch.zeros(n, nodes, dtype=torch.bool).scatter_(1, x // per, True)
        srt = x.sort(1).values
        return hit.sum(1).float().mean().item(), bool((srt[:, 1:] == srt[:, :-1]).any())

    (a, dup_a), (b, dup_b) = stats(fast), stats(ref)
    assert not dup_a and not dup_b and a == pytest.approx(b, abs=0.01) and a > 3.9  # not uniform's 3.6


def test_routing_kinds_and_errors():
    zipf = Routing("zipf", zipf_s=1.2).sample(8, 8, 2000, 8, 64, seed=0)
    counts = torch.bincount(torch.cat(zipf).flatten(), minlength=64)
    assert counts.max() > 3 * counts.float().mean()  # hot experts
    rec = torch.randint(0, 16, (4, 5, 2))
    got = Routing("recorded", recorded=rec).sample(4, 2, 5, 2, 16)
    assert all(torch.equal(g, r) for g, r in zip(got, rec))
    masked = Routing("uniform", masked_slots=3).sample(2, 2, 10, 4, 8)
    assert all(int((m == -1).sum()) <= 3 and int((m == -1).sum()) >= 1 for m in masked)
    with pytest.raises(ValueError, match="kind must be one of"):
        Routing("random")
    with pytest.raises(ValueError, match="needs recorded=topk_idx"):
        Routing("recorded")
    with pytest.raises(ValueError, match=r"num_experts \(10\) must be divisible by the EP size \(4\)"):
        Routing().sample(4, 4, 8, 2, 10)
    with pytest.raises(ValueError, match="holds expert 20"):
        Routing("recorded", recorded=torch.tensor([[20]])).sample(2, 2, 4, 1, 8)


def test_hardware_and_shape_validation():
    with pytest.raises(ValueError, match=r"Fabric.kind must be one of .*got 'ethernet2'"):
        Fabric(kind="ethernet2")
    with pytest.raises(ValueError, match=r"ScaleUp.bandwidth_gbs must be a positive number, got 0"):
        ScaleUp("x", bandwidth_gbs=0)
    with pytest.raises(ValueError, match=r"Nic.initiator must be one of \('gpu', 'proxy', 'host'\)"):
        Nic(initiator="cpu")
    with pytest.raises(ValueError, match=r"ScaleUp.server_size \(5\) must divide domain_size \(16\)"):
        ScaleUp(domain_size=16, server_size=5)
    with pytest.raises(ValueError, match=r"hidden \(100\) must be a multiple of scale_block"):
        ModelShape(hidden=100)
    with pytest.raises(ValueError, match="combine_dtype cannot be int8"):
        ModelShape(combine_dtype="int8")
    with pytest.raises(ValueError, match=r"EP size 12 must be a multiple of the scale-up domain size \(8\)"):
        predict(get_preset("h800_ib"), ModelShape(tokens_per_rank=8, num_experts=24), Routing(), 12)
    with pytest.raises(ValueError, match=r"Profile.rdma_efficiency is a fraction .* \(0, 1\], got 1.5"):
        Profile("p", "p", "deepep_v1", rdma_efficiency=1.5)
    with pytest.raises(ValueError, match="Profile.family must be one of"):
        Profile("p", "p", "nccl")
    # INT8 carries one float32 scale per token; FP8 one per 128 channels.
    assert ModelShape(dispatch_dtype="int8").dispatch_row_bytes() == 7168 + 4 + 8 * 12 + 4
    assert ModelShape().deepep_token_bytes("dispatch") == 7168 * 2 * (1 + 4 / 128) / 2


def test_preset_format_round_trip_and_errors(tmp_path):
    hw = get_preset("h200_efa")
    assert Hardware.from_dict(hw.to_dict()) == hw
    assert hw.nic.line_gbs == pytest.approx(2 * 200 / 8) and hw.nic.initiator == "proxy"
    assert not hw.fabric.ordered and hw.fabric.routing == "spray"
    a3 = get_preset("ascend_a3_superpod")
    assert a3.domain_size == 768 and a3.gpus_per_node == 16
    with pytest.raises(ValueError, match=r"unknown nic key\(s\) \['port_gb'\]"):
        Hardware.from_dict({"name": "x", "gpus_per_node": 8, "nic": {"port_gb": 400}})
    with pytest.raises(ValueError, match=r"hardware preset needs \['gpus_per_node'\]"):
        Hardware.from_dict({"name": "x"})
    with pytest.raises(ValueError, match=r"unknown hardware key\(s\) \['nics'\]"):
        Hardware.from_dict({"name": "x", "gpus_per_node": 8, "nics": {}})
    # A JSON file in the same format is a preset; shared NICs divide the line rate.
    path = tmp_path / "box.json"
    path.write_text(json.dumps({"name": "box", "gpus_per_node": 4,
                                "nic": {"port_gbps": 100, "ports": 2, "gpus_per_nic": 4}}))
    box = get_preset(str(path))
    assert box.name == "box" and box.nic.line_gbs == pytest.approx(100 * 2 / 4 / 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_preset(str(tmp_path / "none.json"))


def test_presets_and_profiles_load_and_unknown_names_are_named():
    names = preset_names()
    assert {"h800_ib", "h800_roce", "h800_roce_tor", "h100_ib", "h200_ib", "h200_efa", "b200_ib",
            "b200_efa", "gb200_nvl72", "mi300x_ib", "ascend_910b", "ascend_a3_superpod"} <= set(names)
    for n in names:
        assert get_preset(n).name == n
    assert {"deepep_v1", "deepep_v2", "flexep_nccl"} <= set(profile_names())
    for n in profile_names():
        assert get_profile(n).name == n
    with pytest.raises(ValueError, match="unknown hardware preset 'nope'; available: .*h800_ib"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown implementation profile 'nope'; available: .*deepep_v1"):
        get_profile("nope")


def test_nelder_mead_finds_a_known_minimum():
    x, fx = nelder_mead(lambda v: (v[0] - 3) ** 2 + 2 * (v[1] + 1) ** 2 + 5, [0.0, 0.0])
    assert x == pytest.approx([3.0, -1.0], abs=1e-3) and fx == pytest.approx(5.0, abs=1e-6)


# ---- mechanisms on real presets -------------------------------------------------------------


def _one(preds, mode, phase):
    return next(p for p in preds if p.mode == mode and p.phase == phase)


def test_hardware_moves_the_limits_the_profile_keeps():
    # The same V1 kernels: H800's NVLink (200 GB/s) bounds EP8; on H200 (450 GB/s) the kernel's
    # SMs do, at about twice the bandwidth (DeepEP publishes 153 GB/s on H800, UCCL-EP 320 on H200).
    shape = ModelShape(tokens_per_rank=1024)
    h800 = _one(predict(get_preset("h800_ib"), shape, Routing(), 8, ("flat",)), "flat", "dispatch")
    h200 = _one(predict(get_preset("h200_ib"), shape, Routing(), 8, ("flat",)), "flat", "dispatch")
    assert h800.bottleneck.startswith("scaleup") and h200.bottleneck.startswith("sm_")
    assert 1.6 < h200.deepep_gbs / h800.deepep_gbs < 2.4
    # DeepEP V2 with 6 SMs on 4 nodes stays NIC-bound: as fast as with 24 SMs (its README: 61 GB/s
    # with 6 SMs), not 4x slower.
    v2 = [_one(predict(get_preset("h100_ib"), shape, Routing(), 32, ("hierarchical",),
                       profile="deepep_v2", sms=s), "hierarchical", "dispatch") for s in (6, 24)]
    assert v2[0].bottleneck.startswith("nic") and v2[0].time_us == pytest.approx(v2[1].time_us, rel=0.03)
    # V2 sizes its SM count from the traffic when none is given.
    auto = _one(predict(get_preset("b200_ib"), shape, Routing(), 8, ("flat",), profile="deepep_v2"),
                "flat", "dispatch")
    assert 4 <= auto.sms <= 148 and auto.sms % 2 == 0


def test_large_scale_up_domain_and_two_tiers():
    # NVL72: EP64 stays inside the NVLink domain (no NIC bytes); a thinner second tier between
    # servers slows the exchange once it leaves the server.
    shape = ModelShape(tokens_per_rank=512)
    nvl = get_preset("gb200_nvl72")
    p = _one(predict(nvl, shape, Routing(), 64, ("flat",)), "flat", "dispatch")
    assert p.bytes_per_rank["nic"] == 0 and p.bytes_per_rank["scaleup"] > 0
    thin_tier = ScaleUp(**{**nvl.scale_up.__dict__, "cross_server_gbs": 100.0})
    thin = Hardware(**{**nvl.__dict__, "scale_up": thin_tier})
    q = _one(predict(thin, shape, Routing(), 64, ("flat",)), "flat", "dispatch")
    # 60 of 63 peers sit on other servers: the thin tier (100 GB/s) carries almost all bytes,
    # against the SMs' ~340 GB/s that bound the full-rate domain.
    assert q.bottleneck == "scaleup_cross" and q.time_us - q.fixed_us > 3 * (p.time_us - p.fixed_us)
    # A mesh (xGMI, HCCS) gives each pair only its own link (448 / 7 = 64 GB/s): rank 0 sending
    # all its tokens to rank 1 is 7x slower than its total scale-up rate would allow.
    rec = torch.full((8, 1024, 2), -1)
    rec[0] = torch.tensor([8, 9])
    mesh = get_preset("mi300x_ib")
    z = _one(predict(mesh, ModelShape(tokens_per_rank=1024, num_experts=64, topk=2),
                     Routing("recorded", recorded=rec), 8, ("flat",), sms=128), "flat", "dispatch")
    assert z.bottleneck == "scaleup_pair"
    assert z.terms_us["scaleup_pair"] == pytest.approx(7 * z.terms_us["scaleup_send"])


def test_low_latency_on_a_proxy_nic_and_unordered_fabric_costs_more():
    shape = ModelShape(tokens_per_rank=128)
    ib, efa = (_one(predict(get_preset(n), shape, Routing(), 32, ("low_latency",)), "low_latency", "dispatch")
               for n in ("h200_ib", "h200_efa"))
    assert efa.time_us > ib.time_us
    assert {"proxy_handoff", "completion_wait", "proxy_post"} <= set(efa.terms_us)
    assert not {"proxy_handoff", "completion_wait", "proxy_post"} & set(ib.terms_us)


def test_ecmp_dense_and_sparse_link_indexing_agree():
    gen = torch.Generator().manual_seed(0)
    path = torch.randint(4, (3, 50), generator=gen)
    leaf = torch.randint(2, (50,), generator=gen)
    nbytes = torch.rand(150, generator=gen)
    dense = _max_link_load(path, leaf, nbytes, 2, 4)
    sparse = _max_link_load(path, leaf, nbytes, 2, 1 << 17)  # same links, indexed sparsely
    assert torch.allclose(dense, sparse)


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_table_json_and_errors(capsys):
    assert planner_cli.main(["--ep", "8,16", "--modes", "flat,low_latency", "--tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert "h800_ib" in out and "low_latency" in out and "deepep_GB/s" in out
    assert planner_cli.main(["--ep", "16", "--tokens", "128", "--channels", "1,4", "--json",
                             "--preset", "h800_ib,h800_roce_tor"]) == 0
    data = json.loads(capsys.readouterr().out)
    preds = data["predictions"]
    assert len(preds) == 2 * 2 * 3 * 2  # presets x channels x modes x phases
    assert {p["preset"] for p in preds} == {"h800_ib", "h800_roce_tor"}
    assert all(p["time_us"] > 0 and "deepep_gbs" in p and p["why"] for p in preds)
    assert all(sum(p["shares"].values()) == pytest.approx(1.0) for p in preds)
    assert planner_cli.main(["--preset", "nope"]) == 2
    assert "unknown hardware preset 'nope'" in capsys.readouterr().err
    assert planner_cli.main(["--ep", "12", "--tokens", "64"]) == 2
    assert "must be a multiple of the scale-up domain size" in capsys.readouterr().err
    assert planner_cli.main(["--list-presets"]) == 0
    assert "ascend_910b" in capsys.readouterr().out
    # The earlier --copy-channels N means 2N SMs.
    assert planner_cli.main(["--ep", "16", "--tokens", "128", "--modes", "hierarchical", "--copy-channels",
                             "3", "--json"]) == 0
    assert {p["sms"] for p in json.loads(capsys.readouterr().out)["predictions"]} == {6}
    assert planner_cli.main(["--sms", "4", "--copy-channels", "2"]) == 2
    assert "not both" in capsys.readouterr().err
    assert planner_cli.main(["--list-profiles"]) == 0
    out = capsys.readouterr().out
    assert "deepep_v2" in out and "flexep_nccl" in out and "[estimated]" in out
    # Several profiles on one preset; every row says what dominates it.
    assert planner_cli.main(["--ep", "16", "--tokens", "128", "--modes", "hierarchical", "--profile",
                             "deepep_v1,deepep_v2,flexep_nccl"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("h800_ib")]
    assert len(rows) == 3 * 2 and all("%" in r for r in rows)
    assert "are estimates, not fitted" in out


def test_cli_plot_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plan.png"
    assert planner_cli.main(["--ep", "8,16", "--tokens", "128", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_recorded_routing(tmp_path, capsys):
    path = tmp_path / "topk.pt"
    torch.save(torch.randint(0, 64, (100, 4)), path)
    assert planner_cli.main(["--ep", "16", "--experts", "64", "--topk", "4", "--tokens", "32",
                             "--routing", "recorded", "--recorded", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["routing"] == "recorded(100, 4)" and len(data["predictions"]) == 6
    assert planner_cli.main(["--routing", "recorded"]) == 2
    assert "needs --recorded FILE" in capsys.readouterr().err
