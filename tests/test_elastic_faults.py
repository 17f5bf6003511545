"""Elastic EP under real faults: a served decode workload keeps answering after ranks are
SIGKILLed, exit, or freeze (SIGSTOP) and wake (SIGCONT) at every phase of a call, and every
generated token equals the fault-free decode bit for bit.

Each scenario is one spawn of ``tests/elastic_workload.py`` (read its docstring for the workload,
the frontend and the fault actions); several faults run in sequence inside one spawn to keep the
tier short. The oracle is the same decode at EP size 1 in this process (``slotwise_combine``
makes tokens independent of EP size, placement and batch). Phases covered: before the control
round (header), between header and payload, inside combine (normal payload, low-latency weights
round), between a low-latency send and its receive hook (low-latency calls check in-band, in
the payload, so they have no separate header); normal and low-latency mode; world 4 and 2 virtual
nodes x 2; one and two ranks at once; rank 0 (which hosted the store before the launcher did);
a frozen rank that wakes after being excluded and rejoins; a replacement process; DeepEP's
shrink mode (a lost peer masked inside the failing low-latency step).

Stated bounds, with T the timeout (3 s): a lost rank is detected within T + the roll-call window
(1 s) + a margin for this loaded box, a death usually far sooner (its sockets close); the
recovery after detection (agreement, new group, experts restored) takes under T + margin.
"""

from __future__ import annotations

import pytest
import torch
from elastic_workload import initial_placement, layer_for, oracle, serve_worker, shrink_oracle, shrink_worker

from flexep import checkpoint
from flexep.launch import run_local

pytestmark = pytest.mark.faults

T = 3.0
MARGIN = 8.0
SPAWN_LIMIT = 150.0


@pytest.fixture(scope="module")
def ckpt(gloo_world1, tmp_path_factory) -> str:
    """The workload's model as a checkpoint (lost experts are restored from it)."""
    path = str(tmp_path_factory.mktemp("elastic") / "ckpt")
    checkpoint.save(layer_for(gloo_world1, "normal", initial_placement(1, 0)), path)
    return path


def _run(spec: dict, ckpt: str, replacements: int = 0) -> list:
    spec = dict(spec, checkpoint=ckpt, timeout=T)
    return run_local(serve_worker, 4, (spec,), timeout=SPAWN_LIMIT, allow_failures=True,
                     replacements=replacements)


def _finished(results: list, expect_members: list) -> list[dict]:
    """The reports of the processes that finished; they are exactly ``expect_members``."""
    done = [r for r in results if isinstance(r, dict)]
    assert sorted(r["member"] for r in done) == sorted(expect_members), [str(r)[-2000:] for r in results]
    return done


def _check_changes(rep: dict, lost_in_order: list, kinds: list) -> None:
    """The failures this member lived through name the victims, in time, within the bounds."""
    failures = [c for c in rep["history"] if c["kind"] == "failure"]
    assert [c["kind"] for c in rep["history"]] == kinds, rep["history"]
    assert [sorted(c["lost"]) for c in failures] == lost_in_order, failures
    for c in failures:
        assert c["failed_after"] <= T + 1.0 + MARGIN, c
        assert c["agree_s"] + c["form_s"] + c["restore_s"] <= T + MARGIN, c


def _check_tokens(reports: list, expected: torch.Tensor) -> None:
    for rep in reports:
        assert not rep["tokens"].isnan().any(), "every request must be answered in full"
        assert torch.equal(rep["tokens"], expected), (rep["member"], (rep["tokens"] - expected).abs().max())


@pytest.mark.timeout(240)
def test_low_latency_loses_two_ranks_one_after_the_other(ckpt):
    """LL, world 4: rank 3 SIGKILLed between its dispatch send and receive hook; later rank 1
    exits inside the combine's weights round. The two survivors serve everything, exactly."""
    spec = dict(mode="ll", faults=[dict(member=3, iteration=1, phase="before_recv_hook", action="kill"),
                                   dict(member=1, iteration=3, phase="before_weights", action="exit")])
    reports = _finished(_run(spec, ckpt), [0, 2])
    _check_tokens(reports, oracle("ll"))
    for rep in reports:
        assert rep["generation"] == 2 and rep["world"] == 2
        _check_changes(rep, [[3], [1]], ["failure", "failure"])
        assert rep["history"][0]["failed_after"] < T  # a death is seen from its sockets, not a timeout


@pytest.mark.timeout(240)
def test_two_virtual_nodes_lose_a_rank_each_inside_combine_then_a_replacement_joins(ckpt):
    """Normal mode, 2 nodes x 2: ranks 1 and 2 (one per node) die together inside the first
    combine's payload; survivors 0 and 3 go on as 2 nodes x 1 (hierarchical), then a replacement
    process joins (3 ranks on uneven nodes: flat) and experts are re-balanced onto it."""
    spec = dict(mode="normal", ranks_per_node=2, joiner_node="node1", wait_joiners={3: 1},
                faults=[dict(member=1, iteration=1, phase="before_payload", nth=2, action="kill"),
                        dict(member=2, iteration=1, phase="before_payload", nth=2, action="exit")])
    reports = _finished(_run(spec, ckpt, replacements=1), [0, 3, 4])
    _check_tokens(reports, oracle("normal"))
    for rep in reports:
        assert rep["generation"] == 2 and rep["world"] == 3
    for rep in reports[:2]:
        _check_changes(rep, [[1, 2]], ["failure", "admission"])
    assert reports[2]["history"][0]["kind"] == "admission" and reports[2]["history"][0]["joined"] == (4,)


@pytest.mark.timeout(240)
def test_frozen_rank_zero_wakes_excluded_and_rejoins(ckpt):
    """Normal mode: rank 0 freezes (SIGSTOP) before a control round; the others time out, exclude
    it and go on; woken (SIGCONT) it gets StaleGenerationError, rejoins as member 4 and is
    admitted. Later rank 2 is SIGKILLed between the control round and the payload of a dispatch.
    (Low-latency calls carry their checks in the payload: they have no separate header.)"""
    spec = dict(mode="normal", wait_joiners={2: 1},
                faults=[dict(member=0, iteration=1, phase="before_header", action="stop"),
                        dict(member=2, iteration=4, phase="after_header", action="kill")])
    reports = _finished(_run(spec, ckpt), [1, 3, 4])
    _check_tokens(reports, oracle("normal"))
    rejoined = next(r for r in reports if r["member"] == 4)
    assert len(rejoined["excluded"]) == 1 and "member 0 was excluded: generation 1" in rejoined["excluded"][0]
    for rep in reports:
        assert rep["world"] == 3
    for rep in (r for r in reports if r["member"] != 4):
        _check_changes(rep, [[0], [2]], ["failure", "admission", "failure"])
        stall = rep["history"][0]
        assert stall["failed_after"] >= T - 0.05, stall  # a stall is waited for the full timeout
        assert "CommTimeoutError" in stall["error"], stall


@pytest.mark.timeout(240)
def test_mask_and_renormalize_policies_then_restore(ckpt):
    """Normal mode, world 4, one replica per expert: rank 3 exits before its dispatch payload
    under the mask policy: its experts 6 and 7 contribute zero until restore() reads them from
    the checkpoint; then, under renormalize, rank 1 exits and the surviving top-k weights are
    rescaled. Each token equals the single-process decode with the same experts masked."""
    spec = dict(mode="normal", policy="mask", restore_at={3}, policy_at={3: "renormalize"},
                faults=[dict(member=3, iteration=1, phase="before_payload", action="exit"),
                        dict(member=1, iteration=4, phase="before_payload", action="exit")])
    reports = _finished(_run(spec, ckpt), [0, 2])
    masks = reports[0]["masks"]
    assert masks[0] == ([], "mask") and masks[1] == masks[2] == ([6, 7], "mask")
    assert masks[3] == ([], "renormalize")
    assert set(masks[4][0]) >= {2, 3} and masks[4][1] == "renormalize"
    _check_tokens(reports, oracle("normal", masks))
    assert not torch.equal(reports[0]["tokens"], oracle("normal")), "masking must change the tokens"



@pytest.mark.timeout(240)
def test_shrink_mode_masks_the_failing_step_then_regroups(ckpt):
    """Low-latency steps on shrink-mode Buffers (DeepEP's enable_shrink): rank 3 is SIGKILLed
    before a dispatch; the survivors' step does not raise, it masks rank 3 after the timeout
    (its experts 6, 7 contribute zero, as in DeepEP) and the mask policy keeps that answer; the
    group is re-formed without rank 3 and later steps route around 6 and 7. Under the rerun
    policy rank 2's later loss is masked the same way, but that step is re-run on the new
    group with every expert restored, so it equals the fault-free decode."""
    spec = dict(policy="mask", policy_at={3: "rerun"}, steps=5, checkpoint=ckpt, timeout=T,
                faults=[dict(member=3, iteration=1, phase="before_payload", action="kill"),
                        dict(member=2, iteration=3, phase="before_payload", action="kill")])
    reports = _finished(run_local(shrink_worker, 4, (spec,), timeout=SPAWN_LIMIT, allow_failures=True),
                        [0, 1])
    for rep in reports:
        assert rep["masks"] == [[], [6, 7], [6, 7], [], []], rep["masks"]
        expected = shrink_oracle(rep["member"], rep["masks"])
        for step, (got, want) in enumerate(zip(rep["outs"], expected)):
            assert torch.equal(got, want), (rep["member"], step)
        assert not torch.equal(rep["outs"][1], shrink_oracle(rep["member"], [[]])[0])  # really masked
        failures = [c for c in rep["history"] if c["kind"] == "failure"]
        assert [sorted(c["lost"]) for c in failures] == [[3], [2]] and rep["world"] == 2
        assert all("shrink mode" in c["error"] for c in failures), failures
