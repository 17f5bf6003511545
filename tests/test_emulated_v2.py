"""DeepEP V2 faces on an emulated accelerator: sync-free calls never touch the host.

Workers (``emulation_scenarios_v2.py``) run ``EPBuffer``/``ElasticBuffer`` on emulated ``cuda``
(and ``npu``, which has streams) tensors over an NCCL-like group that refuses host tensors.
With ``do_cpu_sync=False`` every call (dispatch, expanded, cached, combine, expanded combine)
runs inside ``host_reads(forbid=True)``; with CPU sync a dispatch may read the device once (its
control round) and the other calls never. Results are checked here against
:mod:`flexep.reference_v2` (bitwise, DeepEP V2's combine recipe included). One spawn per world
size; a 4-rank world has a rank with no tokens and runs on two virtual nodes (hybrid recipe);
``npu`` runs the stream path.
"""

from __future__ import annotations

import emulation as em
import emulation_scenarios as sc
import emulation_scenarios_v2 as sv
import pytest
import torch

from flexep.quant import per_token_cast_back
from flexep.reference_v2 import align, ref_v2_combine, ref_v2_dispatch

pytestmark = [pytest.mark.ranks, pytest.mark.skipif(not em.SUPPORTED, reason=em.UNSUPPORTED)]

WORLD2 = {
    "sync_free_v25_npu": (sv.v2_calls, dict(name="sync_free_v25_npu", kind="npu")),
    "sync_free_v20_fp8_no_amr": (sv.v2_calls, dict(name="sync_free_v20_fp8_no_amr", version="2.0",
                                                   x_kind="fp8", amr=False)),
    "cpu_sync_v25_fp8": (sv.v2_calls, dict(name="cpu_sync_v25_fp8", sync=True, x_kind="fp8", alignment=1)),
    # no control round at all (each source sends num_max_tokens_per_rank rows): nothing but the payload
    "sync_free_no_round": (sv.v2_calls, dict(name="sync_free_no_round", check_consistency=False,
                                             validate=False)),
    "lb": (sv.lb_calls, {}),
}
WORLD4 = {
    "sync_free_2x2": (sv.v2_calls, dict(name="sync_free_2x2", ranks_per_node=2)),
}


@pytest.fixture(scope="module")
def spawns():
    cache: dict = {}

    def get(world: int) -> list:
        if world not in cache:
            scenarios = WORLD2 if world == 2 else WORLD4
            cache[world] = em.run_emulated(sc.run_scenarios, world, "cuda", (scenarios,),
                                           extra_device_types=("npu",), timeout=280, allow_failures=True)
        return cache[world]
    return get


def outcome(results, name: str) -> list:
    lost = [str(r) for r in results if isinstance(r, Exception)]
    if lost:
        pytest.fail(f"scenario {name!r}: the spawn lost rank(s):\n" + "\n".join(lost), pytrace=False)
    failed = [(r, res[name][1]) for r, res in enumerate(results) if res[name][0] != "ok"]
    if failed:
        pytest.fail(f"scenario {name!r} failed on rank {failed[0][0]}:\n{failed[0][1]}", pytrace=False)
    return [res[name][1] for res in results]


def _bits(t):
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_same(u, v) for u, v in zip(a, b))
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _rows(t, lo: int, hi: int):
    return tuple(p[lo:hi] for p in t) if isinstance(t, tuple) else t[lo:hi]


def _bf16(x):
    return per_token_cast_back(*x).to(torch.bfloat16) if isinstance(x, tuple) else x


def check_v2(results, world: int, kw: dict) -> None:
    name, sync, x_kind = kw["name"], kw.get("sync", False), kw.get("x_kind", "bf16")
    alignment, amr, per_node = kw.get("alignment", 4), kw.get("amr", True), kw.get("ranks_per_node") or world
    got = outcome(results, name)
    experts, cap = 8 * world, sv.capacity(world)
    local = experts // world
    inputs = [sc.inputs_for(name, r, world, x_kind, experts) for r in range(world)]
    fp8 = isinstance(inputs[0]["x"], tuple)
    xs = [i["x"][0] if fp8 else i["x"] for i in inputs]
    topk, w = [i["topk"] for i in inputs], [i["w"] for i in inputs]
    ref = ref_v2_dispatch(xs, topk, experts, cap, alignment, w, [i["x"][1] for i in inputs] if fp8 else None)
    for r in range(world):
        g, want, msg = got[r], ref[r], f"{name}, rank {r}"
        n = sum(want.recv_per_source)
        rows = n if sync else world * cap
        recv = g["recv_x"]
        assert (recv[0] if fp8 else recv).shape[0] == rows, msg
        assert _same(_rows(recv, 0, n), (want.recv_x, want.recv_scales) if fp8 else want.recv_x), msg
        assert _same(_rows(g["cached"], 0, n), _rows(recv, 0, n)), msg
        assert torch.equal(g["recv_idx"][:n], want.recv_topk_idx), msg
        assert torch.equal(g["cached_idx"][:n], want.recv_topk_idx), msg
        assert torch.equal(g["recv_w"][:n], want.recv_topk_weights), msg
        assert g["meta"][:n, 0].tolist() == want.src_global, msg
        assert int(g["psum_scaleup"][-1]) == n, msg
        exact = want.expanded_x.size(0)
        expanded = g["expanded"]
        ref_expanded = (want.expanded_x, want.expanded_scales) if fp8 else want.expanded_x
        assert _same(_rows(expanded, 0, exact), ref_expanded), msg
        assert _same(_rows(g["cached_expanded"], 0, exact), ref_expanded), msg
        for t in (expanded if fp8 else (expanded,)):
            assert not _bits(t[exact:]).any(), f"{msg}: expanded rows past the last expert are not zero"
        assert torch.equal(g["expanded_w"][:exact], want.expanded_weights), msg
        assert torch.equal(g["cached_expanded_w"][:exact], want.expanded_weights), msg
        assert g["expanded_psum_expert"].tolist() == want.expert_ends, msg
        aligned = [align(c, alignment) for c in want.expert_counts]
        assert g["psum_expert"].tolist() == torch.tensor(aligned).cumsum(0).tolist(), msg
        assert g["counts_list"] == (aligned if sync else []), msg
        assert g["stats"].tolist() == want.expert_counts, msg
        if fp8:
            assert g["sf_strides"] == (1, -(-expanded[1].size(0) // 4) * 4), msg  # TMA column-major
    hybrid = per_node < world and amr
    for s in range(world):
        g, idx, msg = got[s], topk[s], f"{name}, source rank {s}"
        x = _bf16(inputs[s]["x"])
        per_slot = x.unsqueeze(1).expand(-1, idx.size(1), -1).clone()
        per_slot[idx < 0] = 0
        bias = (torch.ones(x.size(0), sc.H, dtype=torch.bfloat16),)
        # non-expanded: every rank returns the token's row once, counted at that rank's last slot
        last = torch.zeros_like(per_slot)
        owner = torch.where(idx >= 0, idx // local, -1)
        for t in range(idx.size(0)):
            for k in range(idx.size(1)):
                if owner[t, k] >= 0 and not (owner[t, k + 1:] == owner[t, k]).any():
                    last[t, k] = x[t]
        want = ref_v2_combine(last, idx, experts, world, per_node, bias, False, hybrid)
        assert torch.equal(g["combined"], want), msg
        want_e = ref_v2_combine(per_slot, idx, experts, world, per_node, bias, amr, hybrid)
        assert torch.equal(g["expanded_combined"], want_e), msg
        assert torch.equal(g["combined_w"], torch.where(idx >= 0, w[s], 0.0)), msg
        if amr:
            assert torch.equal(g["expanded_combined_w"], torch.where(idx >= 0, w[s], 0.0)), msg


def check_reads(results, name: str, sync: bool) -> None:
    for r, g in enumerate(outcome(results, name)):
        for call, (count, report) in g["reads"].items():
            allowed = int(sync and call in ("dispatch", "expanded dispatch", "dispatch with stats"))
            assert count <= allowed, f"{name}, rank {r}, {call}: {count} host reads (allowed {allowed}):\n" \
                + report


@pytest.mark.parametrize("world,scenario", [(2, n) for n in WORLD2 if n != "lb"] + [(4, n) for n in WORLD4])
def test_v2_calls_on_device(spawns, world, scenario):
    kw = (WORLD2 if world == 2 else WORLD4)[scenario][1]
    results = spawns(world)
    check_reads(results, kw["name"], kw.get("sync", False))
    check_v2(results, world, kw)


def test_sync_free_calls_read_nothing(spawns):
    """The no-host-read guard really ran every sync-free call (and found nothing)."""
    for world, name in ((2, "sync_free_v25_npu"), (2, "sync_free_v20_fp8_no_amr"), (2, "sync_free_no_round"),
                        (4, "sync_free_2x2")):
        for g in outcome(spawns(world), name):
            assert len(g["reads"]) == 7 and all(count == 0 for count, _ in g["reads"].values())


def test_load_balancing_on_device(spawns):
    world, local, slots, width = 2, 2, 2, 8
    mapping = sv.lb_mapping(world, local, slots)
    got = outcome(spawns(2), "lb")
    for r in range(world):
        g = got[r]
        assert g["first_at_storage"]
        want = torch.stack([sv.lb_row(int(e), width) for e in mapping[r]])
        assert torch.equal(g["red_w"], want)
        seed = torch.stack([sv.lb_row(r * local + j, width) for j in range(local)])
        add = torch.zeros_like(seed)
        for holder in range(world):
            for c, e in enumerate(mapping[holder].tolist()):
                if e >= 0 and e // local == r:
                    add[e % local] += torch.arange(c * width, (c + 1) * width,
                                                   dtype=torch.float32) + 100 * holder
        assert torch.equal(g["grads"], seed + add)
        red_seed = torch.arange(slots * width, dtype=torch.float32).view(slots, width) + 100 * r
        assert torch.equal(g["red_g"], red_seed)  # the redundant gradients are left as they were
