"""Re-sharding: a checkpoint saved at EP = N loads at EP = M with bit-identical layer outputs.

One 4-rank Gloo spawn: a trained-looking layer (weights and routing bias perturbed away from its
seed, so loading cannot pass by re-creating the same initial weights) is saved at EP = 4 and at
EP = 2, then loaded into layers built from a *different* seed at EP = 1, 2, 4 (also as two
virtual nodes of two ranks, the hierarchical algorithm) and into an EPLB placement with
replicas. Every layer runs the same global batch, each EP rank its contiguous shard. With
``slotwise_combine`` the outputs must match bit for bit; with DeepEP's per-rank pre-summed
combine, to float32 rounding (sums grouped differently by rank).
"""

from __future__ import annotations

import os

import pytest
import torch
from groups import ep_subgroups

import flexep
from flexep import checkpoint
from flexep.eplb import global_placement
from flexep.launch import run_local
from flexep.moe import MoEConfig, MoELayer

CFG = MoEConfig(hidden=16, intermediate=24, num_experts=8, topk=3, n_group=4, topk_group=2,
                routed_scaling_factor=2.5, num_shared_experts=1)
TOKENS = 16


def _perturbed_layer(buf, seed: int, slotwise: bool) -> MoELayer:
    layer = MoELayer(CFG, buf, seed=seed, slotwise_combine=slotwise)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in layer.parameters():  # same noise on every rank for replicated tensors
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        layer.e_score_correction_bias.copy_(torch.randn(CFG.num_experts, generator=gen) * 0.1)
    return layer


def _forward(layer, x, group) -> torch.Tensor:
    n = x.size(0) // group.size()
    with torch.no_grad():
        return layer(x[group.rank() * n:(group.rank() + 1) * n], low_latency=False)


def _worker(rank: int, world: int, x, root: str) -> dict:
    groups = ep_subgroups(rank, world)
    out = {}
    for slotwise in (True, False):
        tag = "slot" if slotwise else "rank"
        src4 = _perturbed_layer(flexep.Buffer(groups[4]), 1, slotwise)
        out["src4", tag] = _forward(src4, x, groups[4])
        checkpoint.save(src4, os.path.join(root, f"ep4-{tag}"), groups[4])
        # Both EP-2 groups train the same model; each saves its own copy.
        src2 = _perturbed_layer(flexep.Buffer(groups[2]), 2, slotwise)
        out["src2", tag] = _forward(src2, x, groups[2])
        checkpoint.save(src2, os.path.join(root, f"ep2-{tag}-{rank // 2}"))  # the layer's group
        for name, path in (("4to2", f"ep4-{tag}"), ("4to1", f"ep4-{tag}"),
                           ("2to4", f"ep2-{tag}-0"), ("2to4n2", f"ep2-{tag}-1")):
            size = int(name[3])
            # "2to4n2": EP 4 as two nodes of two ranks (hierarchical dispatch/combine).
            buf = flexep.Buffer(groups[size], ranks_per_node=2 if name == "2to4n2" else None)
            assert buf.hierarchical == (name == "2to4n2")
            dst = MoELayer(CFG, buf, seed=99, slotwise_combine=slotwise)
            before = _forward(dst, x, groups[size])
            checkpoint.load(dst, os.path.join(root, path))
            out[name, tag] = (before, _forward(dst, x, groups[size]))
        # Into an EPLB placement: 12 physical slots, hot experts replicated.
        load = torch.tensor([40.0, 1, 3, 25, 2, 9, 1, 7])
        placement = global_placement(load, 12, 4)
        dst = MoELayer(CFG, flexep.Buffer(groups[4]), placement=placement, seed=3,
                       slotwise_combine=slotwise)
        checkpoint.load(dst, os.path.join(root, f"ep4-{tag}"))
        out["eplb", tag] = (None, _forward(dst, x, groups[4]))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    x = torch.randn(TOKENS, CFG.hidden, generator=torch.Generator().manual_seed(3))
    return root, run_local(_worker, 4, (x, root), timeout=240)


def _global(results, key, size, part=None) -> torch.Tensor:
    rows = [results[r][key] if part is None else results[r][key][part] for r in range(size)]
    return torch.cat(rows)


@pytest.mark.ranks
@pytest.mark.parametrize("tag", ["slot", "rank"])
def test_reshard_outputs(run, tag):
    _, results = run
    src4, src2 = _global(results, ("src4", tag), 4), _global(results, ("src2", tag), 2)
    cases = {"4to2": (src4, 2), "4to1": (src4, 1), "2to4": (src2, 4), "2to4n2": (src2, 4),
             "eplb": (src4, 4)}
    for name, (ref, size) in cases.items():
        after = _global(results, (name, tag), size, 1)
        if name != "eplb":
            before = _global(results, (name, tag), size, 0)
            assert not torch.allclose(before, ref, atol=1e-3), f"{name}: differs only after loading"
        if tag == "slot" and name != "eplb":
            assert torch.equal(after, ref), f"{name}: max diff {(after - ref).abs().max():.3g}"
        # Pre-summed combines group the sum by rank, replicas split the experts' matmuls.
        torch.testing.assert_close(after, ref, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.ranks
def test_checkpoint_files_are_plain_per_expert_state_dicts(run):
    root, _ = run
    full4 = checkpoint.consolidate(os.path.join(root, "ep4-slot"))
    assert sorted(os.listdir(os.path.join(root, "ep4-slot"))) == [
        "experts-00000-of-00004.pt", "experts-00001-of-00004.pt", "experts-00002-of-00004.pt",
        "experts-00003-of-00004.pt", "index.json", "replicated.pt"]
    expert_keys = [k for k in full4 if ".experts." in k or k.startswith("experts.")]
    assert sorted(expert_keys) == sorted(f"experts.{e}.{t}" for e in range(8)
                                         for t in ("w_gate", "w_up", "w_down"))
    assert full4["experts.5.w_down"].shape == (CFG.intermediate, CFG.hidden)
    assert {"gate_weight", "e_score_correction_bias", "shared.w_gate"} <= set(full4)
    # Both EP-2 groups saved the same model: identical consolidated checkpoints.
    a = checkpoint.consolidate(os.path.join(root, "ep2-slot-0"))
    b = checkpoint.consolidate(os.path.join(root, "ep2-slot-1"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        checkpoint.load(torch.nn.Linear(2, 2), str(tmp_path))
    (tmp_path / "index.json").write_text('{"format": "other/9"}')
    with pytest.raises(ValueError, match="format 'other/9' is not supported"):
        checkpoint.load(torch.nn.Linear(2, 2), str(tmp_path))
