"""EPLB: placement invariants (pure), then dispatch/combine through replicas on 4 Gloo ranks.

The distributed check uses exact arithmetic: integer token values, weights that are powers of
two and experts that multiply by ``logical id + 1``, so every sum is exact in float32 and the
replicated result must equal both the unreplicated one and a plain-Python oracle bit for bit.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import flexep
from flexep.eplb import (
    Placement,
    global_placement,
    hierarchical_placement,
    pack,
    rank_loads,
    rebalance,
    replicate,
)
from flexep.launch import run_local
from flexep.moe import MoEConfig, MoELayer


def zipf_load(num_experts: int, s: float = 1.2, seed: int = 0) -> torch.Tensor:
    load = 1000.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** s
    return load[torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))]


def check_invariants(p: Placement, num_experts: int, num_physical: int, num_ranks: int) -> None:
    assert p.physical_to_logical.shape == (num_physical,)
    assert p.replica_counts.shape == (num_experts,)
    assert bool((p.replica_counts >= 1).all()), "every logical expert needs a replica"
    assert int(p.replica_counts.sum()) == num_physical, "replica counts must use the whole budget"
    assert torch.equal(torch.bincount(p.physical_to_logical, minlength=num_experts), p.replica_counts)
    assert p.experts_per_rank * num_ranks == num_physical
    for e in range(num_experts):
        slots = p.logical_to_physical[e]
        used = slots[slots >= 0]
        assert used.numel() == int(p.replica_counts[e])
        assert bool((p.physical_to_logical[used] == e).all())
        assert bool((slots[used.numel():] == -1).all())


CASES = [(16, 16, 4, 1, 1), (16, 20, 4, 4, 2), (64, 80, 8, 8, 2), (256, 288, 32, 8, 4), (12, 16, 4, 3, 1)]


@pytest.mark.parametrize("num_experts,num_physical,num_ranks,num_groups,num_nodes", CASES)
def test_placement_invariants_and_balance(num_experts, num_physical, num_ranks, num_groups, num_nodes):
    load = zipf_load(num_experts)
    before = rank_loads(load, Placement.identity(num_experts, num_ranks))
    for p in (global_placement(load, num_physical, num_ranks),
              rebalance(load, num_physical, num_ranks, num_groups, num_nodes)):
        check_invariants(p, num_experts, num_physical, num_ranks)
        after = rank_loads(load, p)
        torch.testing.assert_close(after.sum(), load.sum())
        assert after.max() <= before.max() + 1e-9
        # No rank holds two replicas of one expert when the replicas fit on distinct ranks.
        if int(p.replica_counts.max()) <= num_ranks // num_nodes:
            per_rank = p.physical_to_logical.view(num_ranks, -1)
            assert all(len(set(r.tolist())) == r.numel() for r in per_rank)
    if num_physical > num_experts:
        assert rank_loads(load, global_placement(load, num_physical, num_ranks)).max() < before.max()


def test_hierarchical_keeps_groups_whole_on_one_node():
    num_experts, num_groups, num_nodes, num_ranks = 64, 8, 2, 8
    p = hierarchical_placement(zipf_load(num_experts), 96, num_ranks, num_groups, num_nodes)
    check_invariants(p, num_experts, 96, num_ranks)
    node_of_slot = torch.arange(96) // (96 // num_nodes)
    group_of_slot = p.physical_to_logical // (num_experts // num_groups)
    for g in range(num_groups):
        nodes = node_of_slot[group_of_slot == g].unique()
        assert nodes.numel() == 1, f"group {g} is split over nodes {nodes.tolist()}"
    per_node = [group_of_slot[node_of_slot == n].unique().numel() for n in range(num_nodes)]
    assert per_node == [num_groups // num_nodes] * num_nodes


def test_replicate_minimises_the_largest_load_per_replica():
    load = torch.tensor([9.0, 5.0, 4.0, 1.0])
    for slots in range(4, 9):
        counts = replicate(load, slots)
        best = min(max(w / c for w, c in zip(load.tolist(), comp))
                   for comp in itertools.product(range(1, slots + 1), repeat=4) if sum(comp) == slots)
        assert float((load / counts).max()) == pytest.approx(best)


def test_pack_and_to_physical_examples():
    assert pack([5, 4, 3, 2], 2) == [[0, 3], [1, 2]]
    p = Placement.from_physical_to_logical(torch.tensor([0, 1, 0, 2]), 3, 2)
    assert p.logical_to_physical.tolist() == [[0, 2], [1, -1], [3, -1]]
    assert p.to_physical(torch.tensor([[0, 1], [0, 2], [-1, 0]])).tolist() == [[0, 1], [2, 3], [-1, 0]]
    # Round robin: 10 tokens on expert 0 split 5 / 5 over its two replicas.
    phys = p.to_physical(torch.zeros(10, 1, dtype=torch.int64), token_offset=3)
    assert torch.bincount(phys.flatten(), minlength=4).tolist() == [5, 0, 5, 0]


def test_placement_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"num_physical \(18\) must be divisible by num_ranks \(4\)"):
        global_placement(zipf_load(16), 18, 4)
    with pytest.raises(ValueError, match=r"experts \[2\] have none"):
        Placement.from_physical_to_logical(torch.tensor([0, 1, 0, 1]), 3, 2)
    with pytest.raises(ValueError, match=r"num_groups \(6\) must be divisible by num_nodes \(4\)"):
        hierarchical_placement(zipf_load(12), 16, 4, 6, 4)


# ---- dispatch/combine through replicas ----------------------------------------------------------
E, TOKENS, TOPK = 8, 12, 3
HOT_LOAD = torch.tensor([50.0, 1, 2, 30, 1, 8, 1, 20])
LAYER_CFG = MoEConfig(hidden=16, intermediate=24, num_experts=E, topk=3, n_group=4, topk_group=2,
                      num_shared_experts=1)


def _inputs(rank: int):
    gen = torch.Generator().manual_seed(rank)
    scores = torch.rand(TOKENS, E, generator=gen)
    scores[:8, 0] += 2  # make expert 0 hot
    topk = scores.topk(TOPK, 1).indices
    topk[5, 1] = -1
    x = (torch.arange(TOKENS).unsqueeze(1) + 100 * rank + torch.arange(4)).float()  # rank-stamped
    w = torch.tensor([1.0, 0.5, 0.25]).repeat(TOKENS, 1)
    return topk, x, w


def _through(buf, placement: Placement, topk, x, w):
    """Dispatch to physical replicas; expert l multiplies by l + 1; weighted; combine."""
    physical = placement.to_physical(topk, token_offset=buf.rank)
    lay = buf.get_dispatch_layout(physical, placement.num_physical)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1], is_token_in_rank=lay[3],
        num_tokens_per_expert=lay[2], topk_idx=physical, topk_weights=w)
    local = placement.physical_to_logical.view(buf.group_size, -1)[buf.rank]
    scale = torch.where(recv_idx >= 0, (local[recv_idx.clamp(min=0)] + 1).float() * recv_w, 0.0)
    out, _, _ = buf.combine(recv_x * scale.sum(1, keepdim=True), handle)
    return out, counts, local


def _scaled_layer(buf, placement=None) -> MoELayer:
    """A layer whose expert weights depend on the logical id only, and not just on the seed."""
    layer = MoELayer(LAYER_CFG, buf, placement=placement, seed=4)
    with torch.no_grad():
        scale = (1 + 0.1 * layer.experts.logical_ids.float()).view(-1, 1, 1)
        for t in (layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down):
            t.mul_(scale)
    return layer


def _apply_placement(buf, rank: int) -> dict:
    layer = _scaled_layer(buf)
    x = torch.randn(6, LAYER_CFG.hidden, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        before = layer(x)
        new = global_placement(HOT_LOAD, 12, buf.group_size)
        layer.apply_placement(new)
        moved = layer(x)
        expected = _scaled_layer(buf, new).experts
        same = all(torch.equal(getattr(layer.experts, n), getattr(expected, n))
                   for n in ("w_gate", "w_up", "w_down", "logical_ids"))
        layer.apply_placement(Placement.identity(E, buf.group_size))
        return dict(before=before, moved=moved, back=layer(x), weights_moved_right=same)


def _worker(rank: int, world: int) -> dict:
    buf = flexep.Buffer(dist.group.WORLD)
    topk, x, w = _inputs(rank)
    replicated = global_placement(HOT_LOAD, 12, world)
    plain, _, _ = _through(buf, Placement.identity(E, world), topk, x, w)
    out, counts, local = _through(buf, replicated, topk, x, w)
    return dict(plain=plain, replicated=out, counts=counts, local=local, placement=replicated,
                layer=_apply_placement(buf, rank))


@pytest.fixture(scope="module")
def results():
    return run_local(_worker, 4, timeout=120)


@pytest.mark.ranks
def test_apply_placement_moves_weights_and_keeps_outputs(results):
    for res in results:
        out = res["layer"]
        assert out["weights_moved_right"]
        torch.testing.assert_close(out["moved"], out["before"], rtol=1e-6, atol=1e-6)
        assert torch.equal(out["back"], out["before"])


@pytest.mark.ranks
def test_dispatch_combine_with_replicas_is_exact(results):
    placement = results[0]["placement"]
    assert int(placement.replica_counts[0]) >= 2, "the hot expert must be replicated for this test"
    for rank, res in enumerate(results):
        topk, x, w = _inputs(rank)
        oracle = torch.zeros_like(x)
        for t in range(TOKENS):
            for k in range(TOPK):
                if topk[t, k] >= 0:
                    oracle[t] += x[t] * float(w[t, k]) * (int(topk[t, k]) + 1)
        assert torch.equal(res["plain"], oracle)
        assert torch.equal(res["replicated"], oracle)
    # Every replica of the hot expert served tokens, and per logical expert the (token, slot)
    # entries received over all its replicas equal the entries routed to it.
    received = torch.zeros(E, dtype=torch.int64)
    per_slot = torch.zeros(placement.num_physical, dtype=torch.int64)
    for rank, res in enumerate(results):
        for j, n in enumerate(res["counts"]):
            received[int(res["local"][j])] += n
            per_slot[rank * placement.experts_per_rank + j] = n
    every = torch.cat([_inputs(r)[0].flatten() for r in range(4)])
    routed = torch.bincount(every[every >= 0], minlength=E)
    assert torch.equal(received, routed)
    assert bool((per_slot[placement.logical_to_physical[0][:int(placement.replica_counts[0])]] > 0).all())
