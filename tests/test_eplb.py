"""EPLB: placement invariants (pure), then dispatch/combine through replicas on 4 Gloo ranks.

The distributed check uses exact arithmetic: integer token values, weights that are powers of
two and experts that multiply by ``logical id + 1``, so every sum is exact in float32 and the
replicated result must equal both the unreplicated one and a plain-Python oracle bit for bit.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import sys
from typing import Optional

import pytest
import torch
import torch.distributed as dist

import flexep
from flexep.eplb import (
    Placement,
    align_ranks,
    global_placement,
    hierarchical_placement,
    pack,
    rank_loads,
    rebalance,
    replicate,
)
from flexep.launch import run_local
from flexep.moe import MoEConfig, MoELayer
from flexep.moe.balance import colocated, greedy_pack, pack_loads, refine_pack, spread_labels

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


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


def _free_separation(p: Placement, load: torch.Tensor, num_nodes: int) -> Optional[tuple]:
    """A swap of two slots inside one node that separates co-located replicas without raising
    the busiest rank's load above the placement's, or None (brute force, independent of
    flexep's search)."""
    per_slot = (load.double() / p.replica_counts.double())[p.physical_to_logical].tolist()
    size, ranks = p.experts_per_rank, p.num_ranks
    slots = p.physical_to_logical.tolist()
    rank_load = [math.fsum(per_slot[r * size:(r + 1) * size]) for r in range(ranks)]
    limit = max(rank_load)
    per_node = ranks // num_nodes
    for r in range(ranks):
        mine = slots[r * size:(r + 1) * size]
        for a in range(size):
            if mine.count(mine[a]) < 2:
                continue
            for q in range(ranks):
                theirs = slots[q * size:(q + 1) * size]
                if q // per_node != r // per_node or q == r or mine[a] in theirs:
                    continue
                for b in range(size):
                    if theirs[b] in mine:
                        continue
                    d = per_slot[r * size + a] - per_slot[q * size + b]
                    if rank_load[r] - d <= limit and rank_load[q] + d <= limit:
                        return r, a, q, b
    return None


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
    # Refinement never loses to the greedy packing it starts from.
    for refined, greedy in ((global_placement(load, num_physical, num_ranks),
                             global_placement(load, num_physical, num_ranks, refine=False)),
                            (rebalance(load, num_physical, num_ranks, num_groups, num_nodes),
                             rebalance(load, num_physical, num_ranks, num_groups, num_nodes, refine=False))):
        assert rank_loads(load, refined).max() <= rank_loads(load, greedy).max() + 1e-9
    # Co-located replicas remain only where no swap separates them at no cost in balance.
    nodes = num_nodes if num_nodes > 1 and num_groups % num_nodes == 0 else 1
    placed = rebalance(load, num_physical, num_ranks, num_groups, num_nodes)
    assert _free_separation(placed, load, nodes) is None
    assert _free_separation(global_placement(load, num_physical, num_ranks), load, 1) is None
    if num_physical > num_experts:
        assert rank_loads(load, global_placement(load, num_physical, num_ranks)).max() < before.max()


def test_replicas_spread_when_it_costs_nothing():
    # Two hot experts with two replicas each on 2 ranks of 3 slots: the greedy packing puts
    # both replicas of expert 0 on one rank; any placement with one replica of each expert per
    # rank is as balanced, and the refinement finds one.
    load = torch.tensor([8.0, 8.0, 1.0, 1.0])
    greedy = global_placement(load, 6, 2, refine=False)
    refined = global_placement(load, 6, 2)
    assert rank_loads(load, refined).max() <= rank_loads(load, greedy).max()
    for r in refined.physical_to_logical.view(2, -1).tolist():
        assert len(set(r)) == len(r), refined.physical_to_logical.tolist()


def test_pack_refinement_and_spreading():
    # The greedy ends at 56 / 47 / 46; swaps between the heaviest pack and the others reach
    # 52 / 47 / 50.
    w = [4, 16, 1, 29, 27, 13, 14, 20, 25]
    greedy = greedy_pack(w, 3)
    assert sorted(pack_loads(w, greedy)) == [46, 47, 56]
    refined = refine_pack(w, greedy)
    assert sorted(pack_loads(w, refined)) == [47, 50, 52]
    assert sorted(sum(refined, [])) == list(range(9)) and all(len(p) == 3 for p in refined)
    assert pack(w, 3, refine=False) == [sorted(p) for p in greedy]
    # Labels: items of label 0 share a pack only while no swap within the limit separates them.
    assert colocated([0, 0, 1, 1], spread_labels([1.0, 1.0, 1.0, 1.0], [[0, 1], [2, 3]], [0, 0, 1, 1],
                                                 limit=2.0)) == 0
    # Every separating swap of the two 5s would load a pack with 14 > 10: they stay together.
    labels = [0, 0, 1, 2, 3, 4]
    kept = spread_labels([5, 5, 9, 1, 9, 1], [[0, 1], [2, 3], [4, 5]], labels, limit=10)
    assert colocated(labels, kept) == 1


def _pairings(items: list) -> list:
    """All ways to split ``items`` into pairs (as lists of pairs)."""
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    out = []
    for k, other in enumerate(rest):
        for tail in _pairings(rest[:k] + rest[k + 1:]):
            out.append([(first, other)] + tail)
    return out


def test_refined_packing_is_optimal_on_small_instances():
    # Exhaustive check of the balance step on random 6-item, 3-pack instances: the local search
    # need not be optimal, but it must never be worse than the greedy and is usually optimal.
    rng = random.Random(0)
    optimal = 0
    for _ in range(50):
        w = [rng.randint(1, 20) for _ in range(6)]
        best = min(max(w[a] + w[b] for a, b in pair) for pair in _pairings(list(range(6))))
        got = max(pack_loads(w, pack(w, 3)))
        assert got <= max(pack_loads(w, greedy_pack(w, 3)))
        optimal += got == best
    assert optimal >= 45, optimal


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


def test_align_ranks_keeps_balance_and_moves_less():
    current = Placement.from_physical_to_logical(torch.tensor([0, 1, 2, 3]), 4, 2)
    swapped = Placement.from_physical_to_logical(torch.tensor([2, 3, 0, 1]), 4, 2)
    assert align_ranks(swapped, current, 2).physical_to_logical.tolist() == [0, 1, 2, 3]
    load = zipf_load(64, seed=3)
    old = hierarchical_placement(zipf_load(64, seed=4), 96, 8, 8, 2)
    new = rebalance(load, 96, 8, 8, 2)
    aligned = rebalance(load, 96, 8, 8, 2, current=old)
    check_invariants(aligned, 64, 96, 8)
    assert sorted(rank_loads(load, aligned).tolist()) == sorted(rank_loads(load, new).tolist())

    def kept(p: Placement) -> int:  # experts a rank holds under both placements
        return sum(len(set(a) & set(b)) for a, b in zip(p.physical_to_logical.view(8, -1).tolist(),
                                                          old.physical_to_logical.view(8, -1).tolist()))
    assert kept(aligned) >= kept(new)
    # Node blocks move whole: each group still lives on one node.
    group_of_slot = aligned.physical_to_logical // 8
    for g in range(8):
        assert (torch.arange(96)[group_of_slot == g] // 48).unique().numel() == 1


# ---- against DeepSeek's EPLB (its algorithm restated in benchmarks/deepseek_eplb.py) ------------
# The hardest grid cases of benchmarks/eplb_balance.py (the full 54-case grid runs there).
DEEPSEEK_CASES = [("expected", 1.0, 320, 64, 4, "hierarchical"), ("sampled", 1.5, 320, 64, 8, "hierarchical"),
                  ("sampled", 1.5, 288, 32, 4, "hierarchical"), ("expected", 1.5, 320, 32, 1, "global"),
                  ("sampled", 0.5, 320, 32, 8, "hierarchical")]


@pytest.mark.slow
@pytest.mark.parametrize("case", DEEPSEEK_CASES)
def test_at_least_as_balanced_as_deepseek(case):
    import eplb_balance as bench

    row = bench.run_case(*case)
    assert row["flexep"] <= row["deepseek"], row
    # Without refinement flexep's policies are DeepSeek's algorithm: same balance.
    model, s, num_physical, num_ranks, num_nodes, policy = case
    load = bench.case_load(model, s, 0)
    if policy == "hierarchical":
        greedy = hierarchical_placement(load, num_physical, num_ranks, 8, num_nodes, refine=False)
    else:
        greedy = global_placement(load, num_physical, num_ranks, refine=False)
    assert bench.imbalance(load, greedy.physical_to_logical.tolist(), num_ranks) == row["deepseek"]


def test_placement_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"num_physical \(18\) must be divisible by num_ranks \(4\)"):
        global_placement(zipf_load(16), 18, 4)
    with pytest.raises(ValueError, match=r"experts \[2\] have none"):
        Placement.from_physical_to_logical(torch.tensor([0, 1, 0, 1]), 3, 2)
    with pytest.raises(ValueError, match=r"num_groups \(6\) must be divisible by num_nodes \(4\)"):
        hierarchical_placement(zipf_load(12), 16, 4, 6, 4)
    with pytest.raises(ValueError, match="load must be non-negative"):
        global_placement(torch.tensor([1.0, -1.0]), 2, 2)
    with pytest.raises(ValueError, match="load must be finite"):
        global_placement(torch.tensor([1.0, float("nan")]), 2, 2)
    with pytest.raises(ValueError, match=r"num_physical \(2\) must be >= num_experts \(4\)"):
        global_placement(torch.ones(4), 2, 2)


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


def _slotwise_placements(buf, rank: int) -> dict:
    """Slotwise outputs of 3 tokens per rank under three placements (replicas get 0-2 rows)."""
    x = torch.randn(3, LAYER_CFG.hidden, generator=torch.Generator().manual_seed(50 + rank))
    out = {}
    for physical in (8, 12, 16):
        placement = global_placement(HOT_LOAD, physical, buf.group_size) if physical > E else None
        layer = MoELayer(LAYER_CFG, buf, placement=placement, seed=4, slotwise_combine=True)
        with torch.no_grad():
            out[physical] = (layer(x), layer.tokens_per_slot.clone())
    return out


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
                layer=_apply_placement(buf, rank), slotwise=_slotwise_placements(buf, rank))


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


@pytest.mark.ranks
def test_slotwise_outputs_do_not_depend_on_the_placement(results):
    lone = 0
    for res in results:
        ref = res["slotwise"][E][0]
        for physical in (12, 16):
            y, served = res["slotwise"][physical]
            assert torch.equal(y, ref), f"{physical} slots: slotwise output differs from the identity's"
            lone += int((served == 1).sum())
    assert lone > 0, "some replica must receive exactly one row (the case BLAS rounds differently)"
