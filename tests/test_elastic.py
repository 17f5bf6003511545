"""Elastic EP, single process: the membership protocol on a real store with threads as members,
placements and weight-move plans, the mask policies, training checkpoints, stale rows.

The multi-rank behaviour (real kills and stalls) is in ``test_elastic_faults.py``.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import flexep
from flexep.comm.control import FIELDS, MAGIC, OPS, ControlPlane, Header
from flexep.elastic import Membership, MembershipStore, is_failure, plan_placement, plan_sources, slots_for
from flexep.elastic.coverage import MISSING, plan_moves
from flexep.elastic.group import ranks_per_node
from flexep.elastic.membership import node_major
from flexep.elastic.training import load_state, save_state, training_placement
from flexep.errors import CommTimeoutError, PeerFailureError, StaleGenerationError
from flexep.moe import MoEConfig, MoELayer, mask_experts
from flexep.moe.eplb import Placement, replicate


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=10))


def _in_threads(calls: dict) -> dict:
    """Run ``{name: fn}`` concurrently; ``{name: (result or exception, seconds)}``."""
    out = {}

    def run(name, fn):
        start = time.monotonic()
        try:
            out[name] = (fn(), time.monotonic() - start)
        except Exception as exc:  # noqa: BLE001 - compared by the test
            out[name] = (exc, time.monotonic() - start)
    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


GEN0 = Membership(0, (0, 1, 2, 3), ("node0", "node0", "node1", "node1"), 0, first_joiner_id=4)


# ---- membership ---------------------------------------------------------------------------------
def test_survivors_agree_without_waiting_for_the_named_victim(store):
    ms = MembershipStore(store)
    ms.propose(GEN0)
    got = _in_threads({m: (lambda m=m: ms.agree_after_failure(GEN0, m, [3], window=5.0)) for m in (0, 1, 2)})
    decided = {m: r for m, (r, _) in got.items()}
    assert all(r == decided[0] for r in decided.values()), decided
    assert decided[0].generation == 1 and decided[0].members == (0, 1, 2)
    assert decided[0].nodes == ("node0", "node0", "node1") and "lost member(s) [3]" in decided[0].reason
    assert max(s for _, s in got.values()) < 2.0  # nobody waited the 5 s window for rank 3
    assert ms.latest(0) == 1


def test_unnamed_silent_member_is_waited_for_then_excluded(store):
    ms = MembershipStore(store)
    got = _in_threads({m: (lambda m=m: ms.agree_after_failure(GEN0, m, [], window=0.6)) for m in (0, 1, 2)})
    for result, seconds in got.values():
        assert result.members == (0, 1, 2)
        assert seconds >= 0.55  # the window, spent waiting for member 3
    late = _in_threads({3: lambda: ms.agree_after_failure(GEN0, 3, [], window=0.6)})[3][0]
    assert isinstance(late, StaleGenerationError), late
    assert late.generation == 0 and late.current == 1
    assert "member 3 was excluded: generation 1" in str(late) and "rejoin" in str(late)


def test_member_that_left_is_not_waited_for(store):
    ms = MembershipStore(store)
    ms.leave(GEN0, 1)
    got = _in_threads({m: (lambda m=m: ms.agree_after_failure(GEN0, m, [3], window=5.0)) for m in (0, 2)})
    assert all(r.members == (0, 2) and s < 2.0 for r, s in got.values()), got


def test_joiners_are_admitted_node_major(store):
    ms = MembershipStore(store)
    ms.propose(GEN0)
    ticket = ms.take_ticket("node0")
    assert ticket == 1 and ms.tickets() == 1
    waiter = _in_threads({"w": lambda: ms.wait_admission(ticket, timeout=5.0),
                          "m": lambda: (time.sleep(0.2), ms.propose_admission(GEN0, 1))[1]})
    admitted, decided = waiter["w"][0], waiter["m"][0]
    assert admitted == decided
    # Joiner 4 (first_joiner_id + ticket - 1) on node0 goes before node1's members.
    assert decided.members == (0, 1, 4, 2, 3) and decided.nodes == ("node0",) * 3 + ("node1",) * 2
    assert decided.admitted == 1 and decided.generation == 1


def test_admission_and_failure_racing_for_one_generation_agree(store):
    ms = MembershipStore(store)
    ms.take_ticket("node1")
    got = _in_threads({"admit": lambda: ms.propose_admission(GEN0, 1),
                       0: lambda: ms.agree_after_failure(GEN0, 0, [3], window=2.0)})
    assert got["admit"][0] == ms.record(1)
    winner = ms.record(1)
    if 4 in winner.members:  # the admission won: the failed member is in it and forming fails later
        assert got[0][0] == winner
    else:
        assert winner.members == (0,) or 0 in winner.members


def test_joiner_not_admitted_times_out(store):
    ms = MembershipStore(store)
    with pytest.raises(CommTimeoutError, match="join ticket 1 was not admitted within 0.2 s"):
        ms.wait_admission(ms.take_ticket("node0"), timeout=0.2)


def test_rendezvous_names_the_member_that_does_not_come(store):
    ms = MembershipStore(store)
    with pytest.raises(CommTimeoutError, match=r"member\(s\) \[2\] did not arrive within 0.3 s to form "
                                               "generation 5") as info:
        ms.rendezvous(Membership(5, (0, 2), ("a", "a")), 0, timeout=0.3)
    assert info.value.ranks == (1,)


def test_node_shape_and_order():
    assert node_major([0, 1, 3, 7], ["a", "a", "b", "a"]) == ((0, 1, 7, 3), ("a", "a", "a", "b"))
    assert ranks_per_node(["a", "a", "b", "b"]) == 2
    assert ranks_per_node(["a", "a", "b"]) == 3  # uneven nodes: one flat node
    assert ranks_per_node(["a", "b"]) == 1


def test_failures_are_told_apart_from_other_errors():
    assert is_failure(PeerFailureError("x", ranks=[1]))
    assert is_failure(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1234"))
    assert not is_failure(StaleGenerationError("old"))
    assert not is_failure(ValueError("bad input"))
    assert not is_failure(RuntimeError("shape mismatch"))


def test_control_round_refuses_an_older_generation():
    """Rank 1 sends generation 2 rows to ranks at generation 3: every rank raises the typed error."""
    fields = torch.full((3, len(FIELDS)), -2, dtype=torch.int64)
    fields[:, 0], fields[:, 1], fields[:, 2], fields[:, 4] = MAGIC, OPS["dispatch"], 7, 0
    fields[:, 3] = torch.tensor([3, 2, 3])
    header = Header(fields, torch.zeros(3, 3, dtype=torch.int64), torch.zeros(3, 0), torch.zeros(3, 0))
    plane = ControlPlane.__new__(ControlPlane)
    plane.tp, plane.generation = type("T", (), {"seq": 7})(), 3
    with pytest.raises(StaleGenerationError, match=r"rank\(s\) \[1\] belong to an older group") as info:
        plane.verdict("dispatch", header, None, True, None)
    assert info.value.ranks == (1,) and info.value.current == 3
    assert isinstance(info.value, flexep.RankMismatchError)


# ---- placement and weight moves ------------------------------------------------------------------
def test_slots_for_examples():
    assert slots_for(16, 2, 3) == 18 and slots_for(16, 2, 4) == 20 and slots_for(8, 0, 4) == 8


def test_sticky_placement_keeps_what_survivors_hold():
    load = torch.tensor([5.0, 1, 1, 1, 4, 1, 1, 1])
    old = Placement.identity(8, 4).physical_to_logical.view(4, 2).tolist()  # [[0,1],[2,3],[4,5],[6,7]]
    survivors = [old[0], old[1], old[3]]  # rank 2 (experts 4, 5) lost
    placement = plan_placement(load, survivors, 9)
    slots = placement.physical_to_logical.view(3, 3).tolist()
    for kept, now in zip(survivors, slots):
        assert set(kept) <= set(now), (kept, now)  # nothing a survivor holds moves away
    assert sorted(set(sum(slots, []))) == list(range(8))  # every expert covered
    assert placement.replica_counts.tolist() == replicate(load.double(), 9).tolist()
    assert 4 in slots[0] + slots[1] + slots[2] and 5 in sum(slots, [])


def test_sticky_placement_worked_example_growing():
    placement = plan_placement(torch.ones(4), [[0, 1], [2, 3], []], 6)
    assert placement.physical_to_logical.view(3, 2).tolist() == [[0, 1], [2, 3], [0, 1]]


def test_plan_sources_worked_example():
    placement = Placement.identity(4, 2)
    assert plan_sources(placement, [[0, 1, 2], None]) == [[0, 0], [0, MISSING]]
    # Two holders of expert 0 take turns for the slots that need it.
    p = Placement.from_physical_to_logical(torch.tensor([1, 0, 0, 0]), 2, 2)
    assert plan_sources(p, [[0], [1], []][:2]) == [[1, 0], [0, 0]]


def test_move_plans_deliver_each_slot_its_expert():
    """Three ranks plan locally; running the plans as the row exchange does (each source's rows
    for a destination in block order, then the local rows, then ``expand``) fills every slot
    with its expert's row, and the per-pair counts of sender and receiver agree."""
    placement = plan_placement(torch.tensor([2.0, 1, 1, 1, 1]), [[0, 1], [2, 3], []], 6)
    held = [[0, 1], [2, 3], []]
    sources = plan_sources(placement, held)
    wanted = placement.physical_to_logical.view(3, 2).tolist()
    assert wanted[2] == [0, 4]  # a replica of the hot expert 0 moves in; expert 4 had no holder
    row = {e: torch.full((5,), float(e)) for e in range(5)}
    rows = [torch.stack([row[e] for e in h]) if h else torch.zeros(0, 5) for h in held]
    plans = [plan_moves(7, r, wanted, sources, held[r]) for r in range(3)]
    for d, (plan, filled) in enumerate(plans):
        recv = []
        for s, (sent, _) in enumerate(plans):
            assert plan.recv_counts[s] == sent.send_counts[d]
            start = sum(sent.send_counts[:d])
            picked = torch.tensor(sent.send_rows[start:start + sent.send_counts[d]], dtype=torch.int64)
            recv.append(rows[s].index_select(0, picked))
        local = rows[d].index_select(0, torch.tensor(plan.local_rows, dtype=torch.int64))
        got = torch.cat(recv + [local]).index_select(0, torch.tensor(plan.expand, dtype=torch.int64))
        for k, j in enumerate(filled):
            assert torch.equal(got[k], row[wanted[d][j]]), (d, j)
        missing = [j for j in range(2) if j not in filled]
        assert all(wanted[d][j] == 4 for j in missing)  # nobody held it
    assert plans[2][0].recv_counts[0] > 0 and plans[0][0].local_rows  # moves and local copies


# ---- mask policies ---------------------------------------------------------------------------------
def test_mask_experts_worked_example():
    idx = torch.tensor([[0, 1, 2], [1, 1, -1], [1, 3, 1]])
    w = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0], [0.5, 0.25, 0.25]])
    gone = torch.tensor([False, True, False, False])
    i, masked = mask_experts(idx, w, gone)
    assert i.tolist() == [[0, -1, 2], [-1, -1, -1], [-1, 3, -1]]
    assert torch.equal(masked, torch.tensor([[0.5, 0.0, 0.2], [0.0, 0.0, 0.0], [0.0, 0.25, 0.0]]))
    _, renorm = mask_experts(idx, w, gone, renormalize=True)
    torch.testing.assert_close(renorm[0], torch.tensor([0.5 / 0.7, 0.0, 0.2 / 0.7]))
    assert renorm[1].tolist() == [0.0, 0.0, 0.0]  # every expert gone: nothing to renormalise
    torch.testing.assert_close(renorm[2], torch.tensor([0.0, 1.0, 0.0]))


CFG = MoEConfig(hidden=8, intermediate=12, num_experts=4, topk=2)


def _direct(layer: MoELayer, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Token by token, slot by slot: sum_k w[t, k] * expert_k(x[t]) (no shared experts in CFG)."""
    ex, out = layer.experts, torch.zeros_like(x)
    for t in range(x.size(0)):
        for k in range(idx.size(1)):
            e = int(idx[t, k])
            if e >= 0:
                h = torch.nn.functional.silu(x[t] @ ex.w_gate[e]) * (x[t] @ ex.w_up[e])
                out[t] += w[t, k] * (h @ ex.w_down[e])
    return out


def test_layer_routes_around_unavailable_experts(gloo_world1):
    """Masked: equal to the same layer whose lost expert outputs zero. Renormalised: equal to a
    direct computation with the surviving weights rescaled to the original sum."""
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    layer = MoELayer(CFG, flexep.Buffer(gloo_world1), seed=1, slotwise_combine=True)
    with torch.no_grad():
        full = layer(x)
        idx, w = layer.route(x)
        lost = int(idx[0, 0])
        layer.set_unavailable([lost])
        masked = layer(x)
        zeroed = MoELayer(CFG, flexep.Buffer(gloo_world1), seed=1, slotwise_combine=True)
        zeroed.experts.w_down[lost] = 0.0
        assert torch.equal(masked, zeroed(x))
        assert not torch.equal(masked, full)
        layer.set_unavailable([lost], renormalize=True)
        kept = idx != lost
        rescaled = torch.where(kept, w * w.sum(1, keepdim=True) / (w * kept).sum(1, keepdim=True), 0.0)
        torch.testing.assert_close(layer(x), _direct(layer, x, idx, rescaled), rtol=1e-5, atol=1e-6)
        layer.set_unavailable(None)
        assert torch.equal(layer(x), full)
    assert layer.tokens_per_expert.sum() == 4 * 6 * 2  # the demand for masked experts is still counted


# ---- training ------------------------------------------------------------------------------------
def test_training_placement_adds_replicas_only_when_needed():
    assert torch.equal(training_placement(16, 4).physical_to_logical, torch.arange(16))
    p = training_placement(16, 3)
    assert p.num_physical == 18 and p.replica_counts.tolist() == [2, 2] + [1] * 14


def test_training_state_round_trip(gloo_world1, tmp_path):
    """Weights and AdamW moments come back bit for bit, into a module with another placement."""
    layer = MoELayer(CFG, flexep.Buffer(gloo_world1), seed=3)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        layer(torch.randn(8, 8)).square().sum().backward()
        opt.step()
    path = save_state(layer, opt, str(tmp_path), 2, gloo_world1)
    assert path.endswith("step-000002") and (tmp_path / "latest").read_text() == "step-000002"
    placement = Placement.from_physical_to_logical(torch.tensor([3, 2, 1, 0]), 4, 1)
    other = MoELayer(CFG, flexep.Buffer(gloo_world1), placement=placement, seed=9)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    assert load_state(other, other_opt, str(tmp_path)) == 2
    for name in ("w_gate", "w_down"):
        assert torch.equal(getattr(other.experts, name), getattr(layer.experts, name).flip(0))
        moment = other_opt.state[getattr(other.experts, name)]["exp_avg_sq"]
        assert torch.equal(moment, opt.state[getattr(layer.experts, name)]["exp_avg_sq"].flip(0))
    assert float(other_opt.state[other.gate_weight]["step"]) == 2.0
    assert torch.equal(other_opt.state[other.gate_weight]["exp_avg"], opt.state[layer.gate_weight]["exp_avg"])
