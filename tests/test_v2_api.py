"""DeepEP V2's API surface on one rank: sizing numbers, events, the handle, argument errors, and
the local pieces (expanded layout, slot-order reduction) against :mod:`flexep.reference_v2`."""

from __future__ import annotations

import pytest
import torch

import flexep
from flexep.algorithms.contract import SlotOrder
from flexep.algorithms.expand import expand_rows, fold_rows, plan_expand, worst_case_rows
from flexep.algorithms.slot_reduce import last_in_group, owners, slot_reduce, slot_rows
from flexep.deepep.sizing import calculate_buffer_size
from flexep.reference_v2 import ref_v2_combine, ref_v2_dispatch


# ---- sizing: DeepEP's formula, worked examples of the V2 reference (H = 7168) ----------------------
@pytest.mark.parametrize("args,want", [
    ((8, 8, 4096, 7168, 8, False, True, True), 473_956_352),
    ((8, 8, 4096, 7168, 8, True, True, True), 471_859_200),
    ((8, 8, 8192, 7168, 8, True, True, True), 943_718_400),
    ((8, 8, 4096, 7168, 0, False, True, True), 484_442_112),
    ((8, 8, 128, 7168, 8, True, True, True), 16_777_216),
    ((16, 8, 4096, 7168, 8, True, True, True), 1_218_445_312),
    ((16, 8, 4096, 7168, 8, True, False, True), 1_415_577_600),
])
def test_buffer_size_matches_deepep(args, want):
    assert calculate_buffer_size(*args) == want


def test_module_helpers(gloo_world1):
    assert flexep.get_num_allocation_alignment() == 2 << 20 and flexep.get_num_tma_alignment() == 32
    assert flexep.get_physical_domain_size(gloo_world1) == (1, 1)
    assert flexep.get_logical_domain_size(gloo_world1, False) == (1, 1)
    assert flexep.EPBuffer.get_buffer_size_hint(gloo_world1, 128, 256) % (2 << 20) == 0
    assert flexep.comm.get_physical_domain_size(gloo_world1) == (1, 1)


# ---- events ------------------------------------------------------------------------------------------
def test_event_overlap_v2_hook_runs_once_and_returns():
    ev = flexep.EventOverlap(flexep.EventHandle())
    ev.register_hook_after_wait(lambda: ("outputs",))
    with pytest.raises(ValueError, match="already has a hook"):
        ev.register_hook_after_wait(lambda: None)
    assert ev.wait() == ("outputs",) and ev.current_stream_wait() is None
    with ev(release_handle=True):
        pass
    assert ev.event is None
    with pytest.raises(ValueError, match="holds no event"):
        flexep.EventOverlap().current_stream_wait()


# ---- the buffers on one rank ------------------------------------------------------------------------
def _inputs(n=6, hidden=256, experts=8, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=gen).to(torch.bfloat16)
    idx = torch.rand(n, experts, generator=gen).topk(k, 1).indices
    idx[1, 0] = -1
    return x, idx, torch.rand(n, k, generator=gen)


def test_v25_handle_keeps_topk_idx_and_sees_in_place_edits(gloo_world1):
    buf = flexep.EPBuffer(gloo_world1, num_max_tokens_per_rank=8, hidden=256, num_topk=3)
    x, idx, w = _inputs()
    recv_x, recv_idx, recv_w, handle, event = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=8)
    assert handle.topk_idx is idx and event.event is None
    assert handle.num_recv_tokens_per_expert_list == [int((idx == e).sum()) for e in range(8)]
    idx[0, 0] = 7 if int(idx[0, 0]) != 7 else 6
    with pytest.raises(RuntimeError, match="modified in place"):
        buf.combine(recv_x, handle)
    with pytest.raises(ValueError, match="do_handle_copy must be False"):
        buf.dispatch(x, topk_idx=idx, num_experts=8, do_handle_copy=True)


def test_v20_handle_copy_and_v25_defer(gloo_world1):
    v20 = flexep.ElasticBuffer(gloo_world1, num_max_tokens_per_rank=8, hidden=256, num_topk=3)
    x, idx, w = _inputs()
    _, _, _, handle, _ = v20.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=8)
    assert handle.topk_idx is not idx and torch.equal(handle.topk_idx, idx)
    _, _, _, handle, _ = v20.dispatch(x, topk_idx=idx, num_experts=8, do_handle_copy=False)
    assert handle.topk_idx is idx
    v25 = flexep.EPBuffer(gloo_world1, num_max_tokens_per_rank=8, hidden=256, num_topk=3)
    ev = v25.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=8, async_with_compute_stream=True,
                      defer_epilogue=True)
    recv_x, recv_idx, recv_w, handle = ev.wait()
    assert ev.wait() is None  # the outputs come once
    combined, combined_w = v25.combine(recv_x, handle, topk_weights=recv_w, async_with_compute_stream=True,
                                       defer_epilogue=True).wait()
    assert torch.equal(combined[idx.ge(0).any(1)], x[idx.ge(0).any(1)])
    assert torch.equal(combined_w, torch.where(idx >= 0, w, 0.0))


def test_argument_errors_name_the_problem(gloo_world1):
    buf = flexep.ElasticBuffer(gloo_world1, num_max_tokens_per_rank=8, hidden=256, num_topk=3)
    x, idx, w = _inputs()
    _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, num_experts=8)
    cases = [
        (dict(topk_idx=idx, num_experts=8, previous_event=buf.capture()), "allocate_on_comm_stream=True"),
        (dict(topk_idx=idx, num_experts=8, do_zero_padding=True), "do_zero_padding=True requires do_expand"),
        (dict(topk_idx=idx), "needs num_experts"),
        (dict(topk_idx=idx, num_experts=0), "num_experts must be >= 1"),
        (dict(topk_idx=idx, num_experts=8, num_max_tokens_per_rank=4), "more than num_max_tokens_per_rank"),
        (dict(topk_idx=idx, num_experts=8, num_max_tokens_per_rank=4096), "needs .* bytes of buffer"),
        (dict(topk_idx=idx, num_experts=8, num_qps=10**6), "num_allocated_qps"),
        (dict(handle=handle, topk_idx=idx), "takes no topk_idx"),
        (dict(handle=handle, do_cpu_sync=True), "cannot sync with the CPU"),
        (dict(handle=handle, cumulative_local_expert_recv_stats=torch.zeros(8, dtype=torch.int32)),
         "does not count expert tokens"),
        (dict(handle=handle, expert_alignment=4), "must equal the handle's"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            buf.dispatch(x, **kwargs)
    with pytest.raises(ValueError, match="EPHandle returned by this buffer"):
        flexep.ElasticBuffer(gloo_world1, num_max_tokens_per_rank=8, hidden=256).combine(x, handle)
    with pytest.raises(ValueError, match="multiple of 2097152"):
        flexep.EPBuffer(gloo_world1, num_bytes=1000)
    with pytest.raises(TypeError, match="bias must be"):
        buf.combine(x, handle, bias=[x, x, x])


# ---- local pieces against the oracle --------------------------------------------------------------
def test_expanded_layout_matches_the_oracle():
    x, idx, w = _inputs(n=9, experts=8, k=3, seed=4)
    for alignment in (1, 4):
        ref = ref_v2_dispatch([x], [idx], 8, 16, alignment, [w])[0]
        exact = ref.expanded_x.size(0)
        for rows in (exact, worst_case_rows(9, 3, 8, alignment)):
            plan = plan_expand(ref.recv_topk_idx, 8, alignment, rows)
            assert torch.equal(plan.slot_rows, ref.slot_rows)
            assert plan.ends.tolist() == ref.expert_ends and plan.counts.tolist() == ref.expert_counts
            out = expand_rows(ref.recv_x, plan)
            assert torch.equal(out[:exact], ref.expanded_x) and not out[exact:].any()
    assert worst_case_rows(8, 6, 4, 4) == 44


def test_slot_reduce_matches_the_oracle_recipes():
    """Rows as ranks return them (per-rank partials, per-slot values), reduced at the source."""
    gen = torch.Generator().manual_seed(1)
    tokens, k, hidden, world, experts = 7, 4, 16, 4, 8
    idx = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    idx[0, 1] = -1
    y = torch.randn(tokens, k, hidden, generator=gen).to(torch.bfloat16)
    y[idx < 0] = 0
    bias = (torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16),)
    owner = owners(idx, experts // world)
    for ranks_per_node in (0, 2):
        # each rank's partial: its slots summed in slot order (DeepEP's level 1), one row per token
        partial = torch.zeros(tokens * world + 1, hidden, dtype=torch.bfloat16)
        for t in range(tokens):
            for r in range(world):
                mine = [j for j in range(k) if int(owner[t, j]) == r]
                if mine:
                    partial[r * tokens + t] = sum((y[t, j].float() for j in mine),
                                                  torch.zeros(hidden)).bfloat16()
        rowmap = torch.arange(world).unsqueeze(0) * tokens + torch.arange(tokens).unsqueeze(1)
        rows = slot_rows(rowmap, owner, tokens * world)
        order = SlotOrder(idx, experts, ranks_per_node)
        got = slot_reduce(partial, rows, owner, order, world, bias)
        want = ref_v2_combine(y, idx, experts, world, ranks_per_node or world, bias, True,
                              bool(ranks_per_node))
        assert torch.equal(got, want), ranks_per_node
    per_slot = torch.zeros(tokens * world + 1, k * hidden, dtype=torch.bfloat16)
    for t in range(tokens):
        for j in range(k):
            if int(owner[t, j]) >= 0:
                per_slot[int(owner[t, j]) * tokens + t, j * hidden:(j + 1) * hidden] = y[t, j]
    got = slot_reduce(per_slot, rows, owner, SlotOrder(idx, experts, per_slot=True), world, bias)
    assert torch.equal(got, ref_v2_combine(y, idx, experts, world, world, bias, False, False))
    assert last_in_group(torch.tensor([[1, 0, 1, -1]])).tolist() == [[False, True, True, False]]


def test_fold_is_the_adjoint_of_expand():
    x, idx, _ = _inputs(n=5, experts=4, k=2, seed=2)
    ref = ref_v2_dispatch([x], [idx], 4, 8, 2)[0]
    plan = plan_expand(ref.recv_topk_idx, 4, 2, worst_case_rows(5, 2, 4, 2))
    expanded = expand_rows(ref.recv_x, plan)
    folded = fold_rows(expanded, plan, per_slot=False)
    count = (ref.recv_topk_idx >= 0).sum(1, keepdim=True)
    assert torch.equal(folded, (ref.recv_x.float() * count).to(torch.bfloat16))
    wide = fold_rows(expanded, plan, per_slot=True).view(5, 2, -1)
    local = ref.recv_topk_idx >= 0
    assert torch.equal(wide[local], ref.recv_x.unsqueeze(1).expand(-1, 2, -1)[local])
