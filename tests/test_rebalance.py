"""Online rebalancing of a serving MoE layer: the workload shifts, the layer re-places its experts
from the counts it observed, weights move rank to rank, serving continues.

One 4-rank Gloo run (two virtual nodes of two ranks) serves two phases whose hot experts differ.
Checked: outputs are bitwise unchanged by every move (``slotwise_combine=True``) and equal to
float32 rounding otherwise; the busiest rank's observed load over the mean drops after each
rebalance; the weights that arrive are the experts' own; the bytes reported moved equal an
independent count from the placements; a rebalance that would not help moves nothing; ranks
that disagree on the load or the placement raise on every rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import flexep
from flexep.eplb import Placement, global_placement
from flexep.errors import RankMismatchError
from flexep.launch import run_local
from flexep.moe import MoEConfig, MoELayer
from flexep.moe.experts import GroupedExperts

CFG = MoEConfig(hidden=16, intermediate=8, num_experts=16, topk=2, routing="softmax_topk", renormalize=True,
                num_shared_experts=1)
WORLD, TOKENS, PHYSICAL, SEED = 4, 48, 24, 5
ROW_BYTES = 3 * CFG.hidden * CFG.intermediate * 4  # w_gate, w_up, w_down of one expert, float32
HOT = {"A": (0, 1), "B": (10, 11)}  # the hot experts of each phase: on rank 0, then on rank 2


def batch(layer: MoELayer, phase: str, rank: int, draw: int) -> torch.Tensor:
    """[TOKENS, H] tokens whose router prefers the phase's hot experts (and others at random)."""
    gen = torch.Generator().manual_seed(1000 * draw + 10 * rank + ord(phase))
    x = torch.randn(TOKENS, CFG.hidden, generator=gen)
    pull = layer.gate_weight.detach()[list(HOT[phase])].sum(0)
    hot = torch.rand(TOKENS, 1, generator=gen) < 0.6
    return x + hot * 3.0 * pull / pull.norm()


def observed(layer: MoELayer) -> torch.Tensor:
    """[W] (token, slot) pairs each rank served since the counters were cleared."""
    load = layer.tokens_per_slot.sum().view(1)
    out = [torch.zeros_like(load) for _ in range(WORLD)]
    dist.all_gather(out, load)
    return torch.cat(out)


def serve(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, per-rank load) of one batch."""
    layer.tokens_per_slot.zero_()
    with torch.no_grad():
        y = layer(x)
    return y, observed(layer)


def _phase(layer: MoELayer, plain: MoELayer, phase: str, rank: int) -> dict:
    """Serve the phase (statistics), measure, rebalance from the counters, measure again."""
    layer.collect_load()  # a fresh window for this phase
    stats, probe = batch(layer, phase, rank, 0), batch(layer, phase, rank, 1)
    serve(layer, stats)
    y_before, load_before = serve(layer, probe)
    plain_before = plain(probe)
    report = layer.rebalance(num_physical=PHYSICAL)
    plain.apply_placement(report.placement)
    y_after, load_after = serve(layer, probe)
    seeded = GroupedExperts.seeded(layer.experts.logical_ids, CFG.hidden, CFG.intermediate, SEED)
    weights_right = all(torch.equal(getattr(layer.experts, t), getattr(seeded, t))
                        for t in ("w_gate", "w_up", "w_down"))
    return dict(report=report, y_before=y_before, y_after=y_after, load_before=load_before,
                load_after=load_after, plain_before=plain_before, plain_after=plain(probe),
                weights_right=weights_right)


def _worker(rank: int, world: int) -> dict:
    buf = flexep.Buffer(dist.group.WORLD, ranks_per_node=2)
    layer = MoELayer(CFG, buf, seed=SEED, slotwise_combine=True)
    plain = MoELayer(CFG, buf, seed=SEED)  # DeepEP's pre-summed combine, same weights
    out = {"A": _phase(layer, plain, "A", rank)}
    out["B"] = _phase(layer, plain, "B", rank)
    # A rebalance asked to gain 99% cannot: nothing moves.
    layer.collect_load()
    serve(layer, batch(layer, "B", rank, 2))
    out["kept"] = layer.rebalance(min_improvement=0.99)
    out["placement_after_kept"] = layer.placement
    # Disagreements raise on every rank before anything moves.
    errors = {}
    load = torch.ones(CFG.num_experts) * (2 if rank == 1 else 1)
    try:
        layer.rebalance(load)
    except RankMismatchError as exc:
        errors["load"] = str(exc)
    other = global_placement(torch.arange(1.0, 17.0) if rank == 3 else torch.ones(16), PHYSICAL, WORLD)
    try:
        layer.apply_placement(other)
    except RankMismatchError as exc:
        errors["placement"] = str(exc)
    out["errors"] = errors
    with torch.no_grad():  # the layer serves on with the placement it had
        out["still_serving"] = layer(batch(layer, "B", rank, 1))
    return out


@pytest.fixture(scope="module")
def results():
    return run_local(_worker, WORLD, timeout=180)


def _imbalance(load: torch.Tensor) -> float:
    load = load.double()
    return float(load.max() / load.mean())


@pytest.mark.ranks
@pytest.mark.parametrize("phase", ["A", "B"])
def test_outputs_are_bitwise_unchanged_by_a_rebalance(results, phase):
    for rank, res in enumerate(results):
        got = res[phase]
        assert got["report"].applied
        assert torch.equal(got["y_after"], got["y_before"]), f"rank {rank}: slotwise output changed"
        torch.testing.assert_close(got["plain_after"], got["plain_before"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["y_after"], got["plain_after"], rtol=1e-6, atol=1e-6)
        assert got["weights_right"], f"rank {rank}: an expert arrived with another expert's weights"


@pytest.mark.ranks
@pytest.mark.parametrize("phase", ["A", "B"])
def test_busiest_rank_gets_lighter(results, phase):
    got = results[0][phase]
    before, after = _imbalance(got["load_before"]), _imbalance(got["load_after"])
    assert after < before, (phase, before, after)
    assert after < 1.3, after  # near balanced on the batch the counts came from
    report = got["report"]
    assert report.imbalance_after < report.imbalance_before
    hot = HOT[phase]
    assert all(int(report.placement.replica_counts[e]) >= 2 for e in hot), report.placement.replica_counts
    assert all(torch.equal(r[phase]["load_before"], got["load_before"]) for r in results)


def _moved_rows(old: Placement, new: Placement) -> int:
    """Experts a rank holds under ``new`` but did not hold under ``old``, summed over ranks."""
    total = 0
    for r in range(WORLD):
        had = set(old.physical_to_logical.view(WORLD, -1)[r].tolist())
        total += len(set(new.physical_to_logical.view(WORLD, -1)[r].tolist()) - had)
    return total


@pytest.mark.ranks
def test_moved_bytes_are_reported_and_minimal(results):
    old = Placement.identity(CFG.num_experts, WORLD)
    for phase in ("A", "B"):
        reports = [res[phase]["report"] for res in results]
        new = reports[0].placement
        assert all(torch.equal(r.placement.physical_to_logical, new.physical_to_logical) for r in reports)
        rows = _moved_rows(old, new)
        assert rows > 0
        assert all(r.moved.rows == rows and r.moved.bytes == rows * ROW_BYTES for r in reports)
        assert sum(r.moved.sent_bytes for r in reports) == rows * ROW_BYTES
        old = new


@pytest.mark.ranks
def test_a_rebalance_that_does_not_help_moves_nothing(results):
    for res in results:
        kept = res["kept"]
        assert not kept.applied and kept.moved.rows == kept.moved.bytes == kept.moved.sent_bytes == 0
        assert kept.imbalance_after == kept.imbalance_before
        assert torch.equal(res["placement_after_kept"].physical_to_logical,
                           res["B"]["report"].placement.physical_to_logical)


@pytest.mark.ranks
def test_disagreements_raise_on_every_rank(results):
    for res in results:
        assert "ranks passed different loads (rank(s) [1] differ from rank 0)" in res["errors"]["load"]
        message = "ranks passed different placements (rank(s) [3] differ from rank 0)"
        assert message in res["errors"]["placement"]
        assert torch.equal(res["still_serving"], res["B"]["y_after"])


def test_rebalance_arguments_are_checked(gloo_world1):
    layer = MoELayer(CFG, flexep.Buffer(dist.group.WORLD), seed=SEED)
    with pytest.raises(ValueError, match=r"load must be a \[16\] tensor \(one value per logical expert\), "
                                         r"got \(3,\)"):
        layer.rebalance(torch.ones(3))
    with pytest.raises(ValueError, match=r"min_improvement must be in \[0, 1\), got 1.0"):
        layer.rebalance(torch.ones(16), min_improvement=1.0)
    with pytest.raises(ValueError, match=r"placement is for 16 experts on 2 ranks, expected 16 experts on 1"):
        layer.apply_placement(Placement.identity(16, 2))
    # Without a correction bias the bias step only collects the load.
    assert layer.e_score_correction_bias is None
    with torch.no_grad():
        layer(torch.randn(5, CFG.hidden))
    assert int(layer.update_routing_bias().sum()) == 5 * CFG.topk
    assert int(layer.tokens_per_expert.sum()) == 0
