"""Load balancing (DeepEP V2.5): ``lb_prefetch_weights``, ``lb_reduce_grads``, ``BufferAllocator``,
and EPLB replicas that train like one expert.

* DeepEP's ``tests/ep/test_prefetch_weights.py`` (1a1ffbac) and ``tests/ep/test_reduce_grads.py``
  (def86514), ported to 4 Gloo ranks: random, ring and spread mappings, a quarter of the slots
  empty, slots pre-filled with ``0xA5``, rounds with reshaped views and a ``previous_event``, a
  smaller payload sweep; every byte and every sum checked exactly.
* Training with EPLB replicas and :func:`flexep.moe.sync_replica_grads` matches training the same
  model without replicas; without the sync, the copies drift apart (the check can fail).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import flexep
from flexep.launch import run_local
from flexep.moe import MoEConfig, MoELayer, all_reduce_replicated_grads, replica_map, sync_replica_grads
from flexep.moe.eplb import Placement

LOCAL, SLOTS = 4, 4  # experts per rank, redundant slots per rank
PAYLOADS = [(12320, 12256, 32), (1152, 544, 288), (64, 32, 32)]  # bytes per expert (DeepEP's sweep)
HIDDENS = [3080, 24]  # float32 gradient rows


# ---- DeepEP's generators ------------------------------------------------------------------------
def make_mapping(world: int, pattern: str, seed: int) -> torch.Tensor:
    """``[W, SLOTS] int32``: which expert each slot holds; a rank never holds its own experts."""
    gen = torch.Generator().manual_seed(seed)
    num_experts = world * LOCAL
    rows = []
    for r in range(world):
        if pattern == "random":  # ids past this rank's block, shifted over it
            ids = torch.randint(0, num_experts - LOCAL, (SLOTS,), generator=gen)
            row = torch.where(ids >= r * LOCAL, ids + LOCAL, ids)
        elif pattern == "ring":
            row = torch.tensor([(r + 1) % world * LOCAL + c % LOCAL for c in range(SLOTS)])
        else:  # spread: slot c takes an expert of rank r + 1 + c % (W - 1)
            row = torch.tensor([(r + 1 + c % (world - 1)) % world * LOCAL + c % LOCAL for c in range(SLOTS)])
        row = torch.where(torch.rand(SLOTS, generator=gen) < 0.25, -1, row)
        rows.append(row)
    mapping = torch.stack(rows).to(torch.int32)
    owners = torch.where(mapping >= 0, mapping // LOCAL, -1)
    assert not (owners == torch.arange(world).unsqueeze(1)).any()
    return mapping


def make_blob(expert: int, nbytes: int, payload: int) -> torch.Tensor:
    return ((torch.arange(nbytes) + expert * 3 + payload) % 255).to(torch.uint8)


def pattern(hidden: int, key: int) -> torch.Tensor:
    return ((torch.arange(hidden) + key) % 4095 - 2047).to(torch.float32)


def _lb_worker(rank: int, world: int) -> dict:
    plan = flexep.BufferAllocator()
    dsts = [[plan.allocate((SLOTS, n), torch.uint8) for n in sizes] for sizes in PAYLOADS]
    reds = [plan.allocate((SLOTS, h), torch.float32) for h in HIDDENS]
    assert all(t.device.type == "meta" for t in dsts[0])
    buf = flexep.EPBuffer(dist.group.WORLD, num_bytes=flexep.get_num_allocation_alignment(),
                          lb_allocation_plan_or_num_bytes=plan, explicitly_destroy=True)
    storage = buf.runtime.lb_storage
    assert storage.dtype == torch.uint8 and storage.numel() == plan.num_bytes
    assert dsts[0][0].device == storage.device and dsts[0][0].data_ptr() == storage.data_ptr()
    checked = 0
    for p, pattern_name in enumerate(("random", "ring", "spread")):
        for rnd in range(2):
            mapping = make_mapping(world, pattern_name, seed=10 * p + rnd)
            for sizes, dst in zip(PAYLOADS, dsts):
                srcs = [torch.stack([make_blob(rank * LOCAL + j, n, i) for j in range(LOCAL)])
                        for i, n in enumerate(sizes)]
                for with_sf in (True, False):
                    for d in dst:
                        d.fill_(0xA5)
                    buf.barrier()
                    d_in, s_in = (dst, srcs) if with_sf else (dst[:1], srcs[:1])
                    if rnd % 2:  # DeepEP's odd rounds: reshaped views and a previous event
                        d_in = [d.view(SLOTS, -1, 2, 8) for d in d_in]
                        s_in = [s.view(LOCAL, -1, 16) for s in s_in]
                    prev = buf.capture() if rnd % 2 else None
                    buf.lb_prefetch_weights(d_in, s_in, mapping, previous_event=prev).wait()
                    for i, (n, d) in enumerate(zip(sizes, dst)):
                        for c, e in enumerate(mapping[rank].tolist()):
                            want = make_blob(e, n, i) if e >= 0 and (with_sf or i == 0) else \
                                torch.full((n,), 0xA5, dtype=torch.uint8)
                            assert torch.equal(d[c], want), (pattern_name, rnd, sizes, i, c)
                    checked += 1
            for h, red in zip(HIDDENS, reds):
                exp = torch.stack([pattern(h, rank * LOCAL + j) for j in range(LOCAL)])
                seed = exp.clone()
                for c in range(SLOTS):
                    red[c] = pattern(h, -1 - (rank * SLOTS + c))
                buf.barrier()
                prev = buf.capture() if rnd % 2 else None
                buf.lb_reduce_grads(red, exp, mapping, previous_event=prev).wait()
                for j in range(LOCAL):
                    want = seed[j].clone()
                    for r in range(world):
                        for c, e in enumerate(mapping[r].tolist()):
                            if r != rank and e == rank * LOCAL + j:
                                want += pattern(h, -1 - (r * SLOTS + c))
                    assert torch.equal(exp[j], want), (pattern_name, rnd, h, j)
                buf.barrier()
                for c in range(SLOTS):  # the redundant gradients are left as they were
                    assert torch.equal(red[c], pattern(h, -1 - (rank * SLOTS + c)))
                checked += 1
    buf.destroy()
    return {"checked": checked}


@pytest.mark.ranks
def test_deepep_prefetch_and_reduce_ported():
    results = run_local(_lb_worker, 4, timeout=240)
    per_pattern_round = len(PAYLOADS) * 2 + len(HIDDENS)
    assert [r["checked"] for r in results] == [3 * 2 * per_pattern_round] * 4


# ---- EPLB replicas train like one expert -----------------------------------------------------------
CFG = MoEConfig(hidden=16, intermediate=24, num_experts=6, topk=2)
STEPS, LR = 4, 1.0


def _train(layer: MoELayer, x: torch.Tensor, target: torch.Tensor, sync: bool) -> list:
    losses = []
    for _ in range(STEPS):
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        all_reduce_replicated_grads(layer, layer.buffer.group)
        if sync:
            sync_replica_grads(layer)
        with torch.no_grad():
            for p in layer.parameters():
                p -= LR * p.grad
                p.grad = None
        losses.append(float(loss.detach()))
    return losses


def _parity_worker(rank: int, world: int) -> dict:
    gen = torch.Generator().manual_seed(rank)
    x, target = torch.randn(12, CFG.hidden, generator=gen), torch.randn(12, CFG.hidden, generator=gen)
    # 8 slots: experts 0 and 3 are hot and get a copy (on the other rank than their primary).
    replicated = Placement.from_physical_to_logical(torch.tensor([0, 1, 2, 3, 4, 5, 0, 3]),
                                                    CFG.num_experts, world)
    out = {}
    for name, placement, sync in (("plain", None, False), ("replicas", replicated, True),
                                  ("replicas, no sync", replicated, False)):
        layer = MoELayer(CFG, flexep.Buffer(dist.group.WORLD), placement=placement, seed=3)
        losses = _train(layer, x, target, sync)
        experts = {n: p.detach().clone() for n, p in layer.experts.named_parameters()}
        out[name] = dict(losses=losses, ids=layer.experts.logical_ids.clone(), experts=experts)
    return out


@pytest.mark.ranks
def test_training_with_replicas_matches_training_without():
    results = run_local(_parity_worker, 2, timeout=240)
    plain = {}  # logical id -> weights trained without replicas
    for r in range(2):
        for j, e in enumerate(results[r]["plain"]["ids"].tolist()):
            plain[e] = {n: t[j] for n, t in results[r]["plain"]["experts"].items()}
    for name in ("replicas", "replicas, no sync"):
        torch.testing.assert_close(torch.tensor(results[0][name]["losses"][:1]),
                                   torch.tensor(results[0]["plain"]["losses"][:1]), rtol=1e-5, atol=1e-5)
    drift, error = 0.0, 0.0
    for name in ("replicas", "replicas, no sync"):
        copies: dict = {}
        for r in range(2):
            for j, e in enumerate(results[r][name]["ids"].tolist()):
                copies.setdefault(e, []).append({n: t[j] for n, t in results[r][name]["experts"].items()})
        assert sorted(len(v) for v in copies.values()) == [1, 1, 1, 1, 2, 2]
        for e, versions in copies.items():
            for v in versions:
                for n, t in v.items():
                    gap = float((t - plain[e][n]).abs().max() / plain[e][n].abs().max())
                    if name == "replicas":
                        error = max(error, gap)
                        assert torch.equal(t, versions[0][n]), f"copies of expert {e} differ ({n})"
                    else:
                        drift = max(drift, gap)
    # Same model to float32 rounding (the gradient sum is grouped differently) ...
    assert error < 1e-5, f"replicas with sync_replica_grads differ from the plain model by {error:.2e}"
    # ... and a real difference without the sync (so the check above can fail).
    assert drift > 1e-3, f"without sync_replica_grads the copies should drift (got {drift:.2e})"
    for r in range(2):
        torch.testing.assert_close(torch.tensor(results[r]["replicas"]["losses"]),
                                   torch.tensor(results[r]["plain"]["losses"]), rtol=1e-5, atol=1e-5)


# ---- single process ---------------------------------------------------------------------------------
def test_replica_map_names_primaries():
    placement = Placement.from_physical_to_logical(torch.tensor([0, 1, 0, 2]), 3, 2)
    rmap = replica_map(placement)
    assert rmap.mapping.tolist() == [[-1], [0]] and rmap.copies == ((), (0,))
    assert replica_map(Placement.identity(4, 2)).num_redundant == 0


def test_buffer_allocator_plans_then_materializes():
    plan = flexep.BufferAllocator()
    a = plan.allocate((4, 1024), torch.uint8)
    b = plan.allocate((8,), torch.float32)
    align = flexep.get_num_allocation_alignment()
    assert plan.num_bytes == 2 * align and a.device.type == "meta" and b.device.type == "meta"
    storage = torch.zeros(plan.num_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bytes"):
        plan.materialize(torch.zeros(plan.num_bytes - 1, dtype=torch.uint8))
    plan.materialize(storage)
    assert a.device.type == "cpu" and a.data_ptr() == storage.data_ptr()
    assert b.data_ptr() == storage.data_ptr() + align
    b.fill_(1.5)
    assert storage[align:align + 4].view(torch.float32).item() == 1.5
    with pytest.raises(RuntimeError, match="materialized"):
        plan.allocate((1,), torch.uint8)


def test_lb_argument_errors_name_the_problem(gloo_world1):
    plan = flexep.BufferAllocator()
    dst = plan.allocate((2, 32), torch.uint8)
    buf = flexep.EPBuffer(gloo_world1, num_bytes=flexep.get_num_allocation_alignment(),
                          lb_allocation_plan_or_num_bytes=plan, explicitly_destroy=True)
    src = torch.zeros(2, 32, dtype=torch.uint8)
    mapping = torch.tensor([[-1, -1]], dtype=torch.int32)
    buf.lb_prefetch_weights(dst, src, mapping).wait()  # empty slots: nothing moves
    with pytest.raises(ValueError, match="load-balancing storage"):
        buf.lb_prefetch_weights(torch.zeros(2, 32, dtype=torch.uint8), src, mapping)
    with pytest.raises(ValueError, match="multiple of 16"):
        buf.lb_prefetch_weights(dst.view(-1)[:16].view(2, 8), src[:, :8].contiguous(), mapping)
    with pytest.raises(ValueError, match="own expert"):
        buf.lb_prefetch_weights(dst, src, torch.tensor([[0, -1]], dtype=torch.int32))
    with pytest.raises(ValueError, match="redundancy_mapping must be"):
        buf.lb_prefetch_weights(dst, src, torch.tensor([[-1]], dtype=torch.int32))
    buf.destroy()
    no_lb = flexep.EPBuffer(gloo_world1, num_bytes=flexep.get_num_allocation_alignment())
    with pytest.raises(ValueError, match="load-balancing region"):
        no_lb.lb_prefetch_weights(dst, src, mapping)
