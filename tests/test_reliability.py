"""Failures between ranks: mismatched calls, dead and stalled peers, corrupted data, determinism.

Rows of the reliability matrix (``reliability-matrix.md`` §10) covered here:

* B1/B2 mismatch detection (arguments, calls, constructor, ``check_consistency=False``) and B3
  verify mode, on one 2-rank spawn (:func:`world2`);
* F2 determinism, D1 slow-but-in-time rank and C4 frozen (SIGSTOP) rank, on one 4-rank spawn
  (:func:`stall_run`), in that order because the stall poisons the group;
* C1-C3, C5, C6, the store-host victim and a victim on the hierarchical path, one 4-rank spawn
  each (a dead rank poisons the group).

Every spawn warms up on a Buffer with a long timeout first, so process start-up skew never
counts against the short (2-3 s) timeouts under test. Workers only record what happened; the
parent asserts. Inputs are small integers in float32, so every sum is exact and the oracle of a
round trip is simply ``combine(dispatch(x)) == x * (number of ranks that received the token)``.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import signal
import time
from collections import Counter
from datetime import timedelta
from typing import Optional

import pytest
import torch
import torch.distributed as dist

from flexep import Buffer
from flexep.launch import free_port, run_local

pytestmark = pytest.mark.faults

T_FAULT = 3.0  # Buffer(timeout=...) of the fault scenarios
MARGIN = 8.0  # allowed lateness on a loaded 2-core box (roll call window included)
SPAWN_LIMIT = 90.0  # parent deadline for one spawn


# ---- helpers running inside the workers ----------------------------------------------------
def _inputs(rank: int, world: int, *, tokens: int = 8, hidden: int = 64, experts: Optional[int] = None,
            topk: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Integer-valued ``x``, random routing with some ``-1`` slots, and weights."""
    experts = experts or 4 * world
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    x = torch.randint(-8, 8, (tokens, hidden), generator=gen).to(dtype)
    idx = torch.rand(tokens, experts, generator=gen).topk(topk, dim=1).indices
    idx[torch.rand(idx.shape, generator=gen) < 0.2] = -1
    w = torch.rand(tokens, topk, generator=gen)
    return x, idx.contiguous(), w, experts


def _dispatch(buf: Buffer, x, idx, w, experts: int, **kw):
    ntr, _, nte, itr, _ = buf.get_dispatch_layout(idx, experts)
    out = buf.dispatch(x, num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte,
                       topk_idx=idx, topk_weights=w, **kw)
    return out, itr


def _roundtrip(buf: Buffer, rank: int, world: int, seed: int = 0) -> bool:
    """Dispatch then combine the received rows; True if the result is exact."""
    x, idx, w, experts = _inputs(rank, world, seed=seed)
    (recv_x, _, _, _, handle, _), itr = _dispatch(buf, x, idx, w, experts)
    out, _, _ = buf.combine(recv_x, handle)
    return torch.equal(out, x * itr.sum(1, keepdim=True).to(x.dtype))


def _describe(exc: BaseException) -> dict:
    """What the parent needs to judge an exception (exceptions are compared by class name)."""
    return dict(types=[k.__name__ for k in type(exc).__mro__], msg=str(exc),
                ranks=list(getattr(exc, "ranks", ())), op=getattr(exc, "op", ""),
                phase=getattr(exc, "phase", ""),
                cause=None if exc.__cause__ is None else type(exc.__cause__).__name__)


def _attempt(fn) -> dict:
    """Run ``fn``; report its result or exception and the seconds it took."""
    start = time.monotonic()
    try:
        value = fn()
        return dict(ok=True, value=value, elapsed=time.monotonic() - start)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        return dict(ok=False, err=_describe(exc), elapsed=time.monotonic() - start)


class Fault:
    """Fault hook: on ``victims``, act at the ``nth`` occurrence of ``phase`` once armed.

    Actions: ``exit`` (``os._exit``), ``kill`` (SIGKILL self), ``stop`` (SIGSTOP self, after
    posting its pid in the store so a survivor can kill it), ``sleep`` (then ``os._exit``).
    ``slow`` ranks sleep ``slow_s`` before every ``slow_phase`` (default the header; in time, D1).
    """

    def __init__(self, rank: int, spec: dict) -> None:
        self.rank, self.spec, self.armed, self.seen = rank, spec, False, Counter()

    def __call__(self, phase: str) -> None:
        if not self.armed:
            return
        spec = self.spec
        if self.rank in spec.get("slow", ()) and phase == spec.get("slow_phase", "before_header"):
            time.sleep(spec["slow_s"])
        if self.rank not in spec.get("victims", ()) or phase != spec.get("phase"):
            return
        self.seen[phase] += 1
        if self.seen[phase] != spec.get("nth", 1):
            return
        action = spec["action"]
        if action == "exit":
            os._exit(0)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "stop":
            dist.distributed_c10d._get_default_store().set(f"test/victim_pid/{self.rank}", str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)
        if action == "sleep":
            time.sleep(spec["sleep_s"])
            os._exit(0)


def _warm_up(rank: int, world: int) -> None:
    """One round trip with a long timeout: every rank has started before short timeouts run."""
    assert _roundtrip(Buffer(dist.group.WORLD, timeout=60), rank, world)


def _fault_round(rank: int, world: int, spec: dict) -> dict:
    """Rounds of dispatch + combine on a short-timeout Buffer with the fault hook armed."""
    hook = Fault(rank, spec)
    buf = Buffer(dist.group.WORLD, timeout=spec.get("timeout", T_FAULT), explicitly_destroy=True,
                 ranks_per_node=spec.get("ranks_per_node"), num_channels=spec.get("channels", 1),
                 _fault_hook=hook)
    hook.armed = True
    rep = dict(rank=rank, rounds_ok=0)
    for i in range(spec.get("rounds", 2)):
        args = _inputs(rank, world, seed=i)
        got = _attempt(functools.partial(_dispatch, buf, *args))
        if got["ok"]:
            (recv_x, _, _, _, handle, _), itr = got["value"]
            got = _attempt(functools.partial(buf.combine, recv_x, handle))
            if got["ok"]:
                rep["rounds_ok"] += int(torch.equal(got["value"][0], args[0] * itr.sum(1, keepdim=True)))
                continue
        rep["failure"] = dict(err=got["err"], elapsed=got["elapsed"])
        nxt = _attempt(functools.partial(_dispatch, buf, *args))
        rep["next"] = dict(err=nxt.get("err"), elapsed=nxt["elapsed"])
        start = time.monotonic()
        buf.destroy()
        rep["destroy_s"] = time.monotonic() - start
        break
    return rep


def _kill_stopped(victims) -> None:
    """Survivor side of the ``stop`` action: SIGKILL the frozen victims (never the store host)."""
    store = dist.distributed_c10d._get_default_store()
    for v in victims:
        os.kill(int(store.get(f"test/victim_pid/{v}")), signal.SIGKILL)


def _recover(rank: int, survivors: list, port: int) -> dict:
    """C5: survivors rebuild a group on a fresh store and pass a full round trip."""
    start = time.monotonic()
    dist.destroy_process_group()
    new_rank = survivors.index(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=new_rank,
                            world_size=len(survivors), timeout=timedelta(seconds=60))
    ok = _roundtrip(Buffer(dist.group.WORLD, timeout=30), new_rank, len(survivors), seed=7)
    return dict(ok=ok, seconds=time.monotonic() - start)


def _exit_fast() -> None:
    """Skip interpreter teardown once the result is sent: Gloo's destructor would otherwise wait
    for the exchange abandoned at the failure until the group's own (long) timeout."""
    atexit.register(os._exit, 0)


def _fault_worker(rank: int, world: int, spec: dict) -> dict:
    _exit_fast()
    _warm_up(rank, world)
    rep = _fault_round(rank, world, spec)
    survivors = [r for r in range(world) if r not in spec["victims"]]
    if spec.get("recover_port"):
        rep["recovery"] = _recover(rank, survivors, spec["recover_port"])
    return rep


# ---- checks in the parent ----------------------------------------------------------------
def _survivor_reports(results: list, victims) -> list[dict]:
    reports = [r for i, r in enumerate(results) if i not in victims]
    bad = [r for r in reports if not isinstance(r, dict)]
    assert not bad, bad
    for i in victims:  # the victims never report back
        assert not isinstance(results[i], dict), results[i]
    return reports


def _check_failure(rep: dict, victims, kinds: tuple, *, low: float = 0.0, high: float) -> None:
    """The survivor raised a flexep error of ``kinds`` naming exactly ``victims`` in time."""
    fail = rep.get("failure")
    assert fail is not None, rep
    err = fail["err"]
    assert any(k in err["types"] for k in kinds), err
    assert "FlexepRuntimeError" in err["types"] and "RuntimeError" in err["types"], err
    assert sorted(err["ranks"]) == sorted(victims), err
    assert f"not heard from: rank(s) {sorted(victims)}" in err["msg"], err["msg"]
    assert err["cause"] is not None, err  # the backend's own exception is chained
    assert low <= fail["elapsed"] <= high, (fail["elapsed"], low, high)
    nxt = rep["next"]
    assert nxt["err"] is not None and "BrokenCommunicatorError" in nxt["err"]["types"], nxt
    assert "not heard from" in nxt["err"]["msg"], nxt  # it quotes the first failure
    assert nxt["elapsed"] < 1.0, nxt
    assert rep["destroy_s"] < 1.0, rep


def _spawn(spec: dict, world: int = 4) -> list:
    return run_local(_fault_worker, world, (spec,), timeout=SPAWN_LIMIT, allow_failures=True)


# ---- C1 + C5: death before a dispatch, then recovery on a fresh store ---------------------
@pytest.mark.timeout(150)
def test_death_before_dispatch_then_recovery():
    """Rank 3 exits at the start of its second dispatch; survivors name it, then rebuild."""
    spec = dict(victims=[3], phase="before_header", nth=3, action="exit", recover_port=free_port())
    reports = _survivor_reports(_spawn(spec), [3])
    for rep in reports:
        assert rep["rounds_ok"] == 1, rep  # the healthy first round was exact
        _check_failure(rep, [3], ("PeerFailureError", "CommTimeoutError"), high=T_FAULT + MARGIN)
        assert rep["failure"]["err"]["op"] == "dispatch", rep
        assert rep["recovery"]["ok"], rep
        assert rep["recovery"]["seconds"] < 30, rep


# ---- C2, C3, C6, store host: deaths at other points ---------------------------------------
DEATHS = [
    # C3: exit between dispatch and combine (the second header of the round is combine's)
    dict(id="exit_between_dispatch_and_combine", victims=[1], phase="before_header", nth=2,
         action="exit", op="combine"),
    # C2 + C6: two ranks SIGKILLed between the header (counts) round and the payload: both named
    dict(id="two_sigkilled_between_header_and_payload", victims=[1, 3], phase="before_payload",
         action="kill", op="dispatch"),
    # hierarchical (2 virtual nodes of 2): the survivors' node and rail steps still name rank 3
    dict(id="hierarchical_exit_before_payload", victims=[3], phase="before_payload", action="exit",
         op="dispatch", ranks_per_node=2),
    # the same over 2 channels (point-to-point transfers): ranks not wired to rank 3 stop on
    # the failure a peer posts, long before their 25 s deadline
    dict(id="hierarchical_channels_kill_before_payload", victims=[3], phase="before_payload",
         action="kill", op="dispatch", ranks_per_node=2, channels=2, timeout=25.0),
    # rank 0 hosts the store: its death takes the store down, the roll call names the host
    dict(id="store_host_dies_after_header", victims=[0], phase="after_header", action="exit",
         op="dispatch"),
]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("spec", DEATHS, ids=lambda s: s["id"])
def test_peer_death(spec: dict):
    reports = _survivor_reports(_spawn(spec), spec["victims"])
    for rep in reports:
        _check_failure(rep, spec["victims"], ("PeerFailureError", "CommTimeoutError"),
                       high=T_FAULT + MARGIN)
        assert rep["failure"]["err"]["op"] == spec["op"], rep


@pytest.mark.timeout(150)
def test_store_host_stalls_past_the_timeout():
    """C4 on rank 0: it sleeps in the header; the store still answers, so it is named exactly."""
    spec = dict(victims=[0], phase="before_header", action="sleep", sleep_s=T_FAULT + 5)
    reports = _survivor_reports(_spawn(spec), [0])
    for rep in reports:
        _check_failure(rep, [0], ("CommTimeoutError",), low=T_FAULT - 0.05, high=T_FAULT + MARGIN)
        assert "TimeoutError" in rep["failure"]["err"]["types"]
        assert rep["failure"]["err"]["phase"] == "header", rep


# ---- F2 + D1 + C4: healthy work, a slow rank, then a frozen rank --------------------------
def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(bytes(t.contiguous().view(torch.uint8).flatten().tolist()))
    return h.hexdigest()


def _deterministic_outputs(rank: int, world: int, channels: int,
                           ranks_per_node: Optional[int] = None) -> str:
    """Digest of every output of a bf16 dispatch + weighted combine on ``channels`` channels
    (and of a low-latency round trip when the Buffer has it)."""
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(48, 256, generator=gen).bfloat16()  # non-integer: summation order matters
    idx = torch.rand(48, 16, generator=gen).topk(4, dim=1).indices
    w = torch.rand(48, 4, generator=gen)
    buf = Buffer(dist.group.WORLD, timeout=60, num_channels=channels, ranks_per_node=ranks_per_node)
    (recv_x, recv_idx, recv_w, counts, handle, _), _ = _dispatch(buf, x, idx, w, 16)
    y = (recv_x.float() * 1.37 + rank).bfloat16()  # an "expert" that is not the identity
    out, out_w, _ = buf.combine(y, handle, topk_weights=recv_w, bias=x)
    cached, *_ = buf.dispatch(x, handle=handle)
    parts = [recv_x, recv_idx, recv_w, torch.tensor(counts), *handle, out, out_w, cached]
    if ranks_per_node is None and hasattr(Buffer, "low_latency_dispatch"):
        hint = Buffer.get_low_latency_rdma_size_hint(48, 256, world, 16)
        ll = Buffer(dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True, timeout=60,
                    num_channels=channels)
        ll_x, ll_count, ll_handle, _, _ = ll.low_latency_dispatch(x, idx, 48, 16, use_fp8=False)
        ll_y = (ll_x.float() * 1.37 + rank).bfloat16()
        parts += [ll_x[:, :1], ll_count, ll.low_latency_combine(ll_y, idx, w, ll_handle)[0]]
    return _digest(*parts)


def _stall_worker(rank: int, world: int, spec: dict) -> dict:
    _exit_fast()
    _warm_up(rank, world)
    digests = {c: _deterministic_outputs(rank, world, c) for c in (1, 2, 3, 4)}
    digests["1_again"] = _deterministic_outputs(rank, world, 1)
    hier = {c: _deterministic_outputs(rank, world, c, ranks_per_node=2) for c in (1, 2)}
    hier["1_again"] = _deterministic_outputs(rank, world, 1, ranks_per_node=2)
    slow = dict(slow=[2], slow_s=spec["slow_s"], victims=[], timeout=spec["slow_timeout"], rounds=2)
    slow_rep = _fault_round(rank, world, slow)
    # Channels move the payload point to point; the peers of a rank that is late to the payload
    # wait on those transfers past the failure watcher's slice (a timed Gloo send/recv wait that
    # expires would tear the group down).
    slow_p2p = dict(slow, slow_phase="before_payload", channels=2)
    slow_p2p_rep = _fault_round(rank, world, slow_p2p)
    stall = dict(victims=[2], phase="before_payload", action="stop")
    rep = _fault_round(rank, world, stall)  # rank 2 freezes inside and never returns
    if rank == 0:
        _kill_stopped([2])
    return dict(digests=digests, hier=hier, slow=slow_rep, slow_p2p=slow_p2p_rep, stall=rep)


@pytest.fixture(scope="module")
def stall_run() -> list:
    spec = dict(slow_s=1.0, slow_timeout=2.5)
    return run_local(_stall_worker, 4, (spec,), timeout=SPAWN_LIMIT, allow_failures=True)


@pytest.mark.timeout(150)
def test_determinism_across_runs_and_channels(stall_run):
    """F2: bitwise-identical outputs on every rank for 1-4 channels and on a repeated run, for
    the flat path (and low-latency) and for the hierarchical path (2 virtual nodes of 2)."""
    for rank in (0, 1, 3):
        for path in ("digests", "hier"):
            digests = stall_run[rank][path]
            assert len(set(digests.values())) == 1, (rank, path, digests)


@pytest.mark.timeout(150)
def test_slow_rank_within_timeout_succeeds(stall_run):
    """D1: rank 2 sleeps 1 s (timeout 2.5 s) before every header, then before every payload of a
    2-channel (point-to-point) Buffer; every call is exact, none times out."""
    for rank in (0, 1, 3):
        for case in ("slow", "slow_p2p"):
            slow = stall_run[rank][case]
            assert "failure" not in slow, (case, slow)
            assert slow["rounds_ok"] == 2, (case, slow)


@pytest.mark.timeout(150)
def test_frozen_rank_times_out(stall_run):
    """C4: rank 2 is frozen with SIGSTOP before its payload; survivors time out naming it."""
    assert not isinstance(stall_run[2], dict), stall_run[2]  # killed while frozen
    for rank in (0, 1, 3):
        rep = stall_run[rank]["stall"]
        _check_failure(rep, [2], ("CommTimeoutError",), low=T_FAULT - 0.05, high=T_FAULT + MARGIN)
        assert rep["failure"]["err"]["phase"] == "payload", rep


# ---- B1, B2, B3 on two ranks ---------------------------------------------------------------
# (name, header field, arguments rank 1 uses instead of the defaults of _inputs)
MISMATCHES = [
    ("hidden", "hidden", dict(hidden=128)),
    ("dtype", "x_dtype", dict(dtype=torch.bfloat16)),
    ("num_experts", "num_experts", dict(experts=16)),
    ("top_k", "num_topk", dict(topk=3)),
]


class _DoneWork:
    """A finished ``Work`` for the corrupting all-to-all below."""

    def wait(self, timeout=None) -> bool:
        return True


def _corrupting_all_to_all(original, mode: str):
    """``all_to_all_single`` that alters what this rank received from rank 0 (token rows only:
    float tensors, or the packed byte rows small exchanges use; control rows have one row per
    peer and are left alone).

    ``alter`` adds 1 to the first value (or byte) of the block; ``shift`` rotates the block's rows
    by one (same bytes, wrong order). Stands in for a faulty transport, like torchft's fake wrapper.
    """
    def wrapper(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                async_op=False):
        original(output, input, output_split_sizes, input_split_sizes, group=group)
        n0 = output_split_sizes[0] if output_split_sizes else 0
        if (output.is_floating_point() or output.dtype == torch.uint8) and n0 >= 2:
            block = output[:n0]
            if mode == "alter":
                block.view(-1)[0] += 1
            else:
                block.copy_(block.roll(1, 0))
        return _DoneWork() if async_op else None
    return wrapper


def _with_corruption(rank: int, mode: str, fn):
    """Run ``fn`` with rank 1's all-to-all corrupted; always restore it."""
    original = dist.all_to_all_single
    if rank == 1:
        dist.all_to_all_single = _corrupting_all_to_all(original, mode)
    try:
        return _attempt(fn)
    finally:
        dist.all_to_all_single = original


def _verify_cases(rank: int, world: int) -> dict:
    """B3: corrupted exchanges with verify on (flag and environment) and off."""
    out = {}
    args = _inputs(rank, world, tokens=16)
    (good_x, *_), _ = _dispatch(Buffer(dist.group.WORLD, timeout=20), *args)
    # A fresh Buffer's first dispatch moves its rows in an exchange of their own (later small
    # ones ride in the control round, which the corrupting stand-in leaves alone).
    plain = Buffer(dist.group.WORLD, timeout=20, verify=False)
    bad = _with_corruption(rank, "alter", functools.partial(_dispatch, plain, *args))
    out["off"] = dict(ok=bad["ok"], differs=bad["ok"] and not torch.equal(bad["value"][0][0], good_x))
    checked = Buffer(dist.group.WORLD, timeout=20, verify=True)
    out["dispatch_alter"] = _with_corruption(rank, "alter", functools.partial(_dispatch, checked, *args))
    os.environ["FLEXEP_VERIFY"] = "1"
    from_env = Buffer(dist.group.WORLD, timeout=20)
    del os.environ["FLEXEP_VERIFY"]
    (recv_x, _, _, _, handle, _), _ = _dispatch(from_env, *args)
    combine = functools.partial(from_env.combine, recv_x, handle)
    out["combine_shift"] = _with_corruption(rank, "shift", combine)
    out["healthy_after"] = _roundtrip(checked, rank, world, seed=3)
    return out


def _ll_mismatches(rank: int, world: int) -> dict:
    """B1 in low-latency mode: capacity and FP8 mode must agree."""
    hint = Buffer.get_low_latency_rdma_size_hint(16, 128, world, 8)
    buf = Buffer(dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True, timeout=20)
    x, idx, _, _ = _inputs(rank, world, hidden=128, dtype=torch.bfloat16)
    capacity = _attempt(lambda: buf.low_latency_dispatch(x, idx, 8 if rank == 0 else 16, 8, use_fp8=False))
    mode = _attempt(lambda: buf.low_latency_dispatch(x, idx, 8, 8, use_fp8=rank == 0))
    return dict(capacity=capacity, mode=mode)


def _world2_worker(rank: int, world: int, skip_timeout: float) -> dict:
    _exit_fast()
    _warm_up(rank, world)
    res: dict = {}
    buf = Buffer(dist.group.WORLD, timeout=20)
    for name, _, change in MISMATCHES:
        args = _inputs(rank, world, **(change if rank == 1 else {}))
        res[name] = _attempt(functools.partial(_dispatch, buf, *args))
    args = _inputs(rank, world)
    (recv_x, _, _, _, handle, _), _ = _dispatch(buf, *args)
    if rank == 0:  # rank 1 "skips" the dispatch and goes on to combine
        res["op"] = _attempt(functools.partial(_dispatch, buf, *args))
    else:
        res["op"] = _attempt(functools.partial(buf.combine, recv_x, handle))
    res["healthy_after"] = _roundtrip(buf, rank, world, seed=5)
    if hasattr(Buffer, "low_latency_dispatch"):
        res["ll"] = _ll_mismatches(rank, world)
    unchecked = Buffer(dist.group.WORLD, timeout=20, check_consistency=False)
    got = _attempt(functools.partial(_dispatch, unchecked, *_inputs(rank, world, experts=8 + 8 * rank)))
    res["unchecked"] = dict(ok=got["ok"], experts_listed=len(got["value"][0][3]) if got["ok"] else -1)
    res["verify"] = _verify_cases(rank, world)
    res["ctor_channels"] = _attempt(lambda: Buffer(dist.group.WORLD, timeout=20, num_channels=1 + rank))
    res["ctor_default"] = _attempt(lambda: Buffer(dist.group.WORLD, timeout=20,
                                                  num_channels=None if rank == 0 else 2))
    res["after_ctor"] = _roundtrip(buf, rank, world, seed=6)
    # Last, each on its own group (a timeout poisons the group it happens on).
    short = Buffer(dist.new_group([0, 1]), timeout=skip_timeout)
    loose = Buffer(dist.new_group([0, 1]), timeout=skip_timeout, check_consistency=False)
    (recv_x, _, _, _, handle, _), _ = _dispatch(loose, *args)
    # B2: rank 1 never makes the call
    if rank == 0:
        res["skip"] = _attempt(functools.partial(_dispatch, short, *args))
    else:
        time.sleep(skip_timeout + 3)
    # check_consistency=False: a bad combine input raises on rank 1 only; rank 0 times out
    x = recv_x if rank == 0 else recv_x.to(torch.int64)  # a TypeError on rank 1 only
    res["loose_bad_input"] = _attempt(functools.partial(loose.combine, x, handle))
    if rank == 1:
        time.sleep(skip_timeout + 3)
    return res


@pytest.fixture(scope="module")
def world2() -> list:
    return run_local(_world2_worker, 2, (2.0,), timeout=SPAWN_LIMIT)


def _assert_mismatch(got: dict, field: str, odd: list) -> None:
    assert not got["ok"], got
    err = got["err"]
    assert "RankMismatchError" in err["types"], err
    assert f"ranks disagree on {field}" in err["msg"], err["msg"]
    assert err["ranks"] == odd and err["phase"] == "header", err


@pytest.mark.timeout(150)
@pytest.mark.parametrize("name,field", [(n, f) for n, f, _ in MISMATCHES])
def test_argument_mismatch_raises_on_every_rank(world2, name: str, field: str):
    """B1: rank 1 passes a different hidden/dtype/num_experts/top-k: both ranks name it."""
    for rank in (0, 1):
        _assert_mismatch(world2[rank][name], field, [1])


@pytest.mark.timeout(150)
def test_different_calls_raise_on_every_rank(world2):
    """B2: rank 1 skips a dispatch and calls combine: both ranks raise, naming the calls."""
    for rank in (0, 1):
        err = world2[rank]["op"]["err"]
        assert "RankMismatchError" in err["types"], err
        assert "ranks are not making the same call (rank 0: dispatch #" in err["msg"], err["msg"]
        assert "rank 1: combine #" in err["msg"] and err["ranks"] == [1], err
        assert world2[rank]["healthy_after"], "a mismatch must leave the buffer usable"


@pytest.mark.timeout(150)
def test_low_latency_mismatch(world2):
    """B1 in LL mode: a different capacity or FP8 mode on rank 1 is named on both ranks."""
    if "ll" not in world2[0]:
        pytest.skip("low-latency mode not available")
    for rank in (0, 1):
        _assert_mismatch(world2[rank]["ll"]["capacity"], "capacity", [1])
        _assert_mismatch(world2[rank]["ll"]["mode"], "mode", [1])


@pytest.mark.timeout(150)
def test_check_consistency_off_lets_mismatch_through(world2):
    """With ``check_consistency=False`` a num_experts disagreement is not detected: the call
    returns and each rank silently uses its own expert layout (4 vs 8 local experts)."""
    assert world2[0]["unchecked"] == dict(ok=True, experts_listed=4)
    assert world2[1]["unchecked"] == dict(ok=True, experts_listed=8)


@pytest.mark.timeout(150)
def test_skipped_call_times_out_naming_the_silent_rank(world2):
    """B2: rank 1 never makes the call; rank 0 raises CommTimeoutError naming it, not earlier
    than the timeout and not much later."""
    got = world2[0]["skip"]
    assert not got["ok"], got
    err = got["err"]
    assert "CommTimeoutError" in err["types"] and "TimeoutError" in err["types"], err
    assert err["ranks"] == [1] and "not heard from: rank(s) [1]" in err["msg"], err
    assert 2.0 - 0.05 <= got["elapsed"] <= 2.0 + MARGIN, got["elapsed"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("case", ["dispatch_alter", "combine_shift"])
def test_verify_catches_corrupted_exchange(world2, case: str):
    """B3: one altered value, or rows rotated inside one block, between rank 0 and rank 1
    raise ConservationError on both ranks naming the pair 0->1."""
    for rank in (0, 1):
        got = world2[rank]["verify"][case]
        assert not got["ok"], got
        err = got["err"]
        assert "ConservationError" in err["types"], err
        assert "1 (source, destination) pair(s) do not match: 0->1" in err["msg"], err["msg"]
        assert err["ranks"] == [0, 1], err
        assert world2[rank]["verify"]["healthy_after"]


@pytest.mark.timeout(150)
def test_without_verify_corruption_gets_through(world2):
    """Documents the default: with verify off the altered row is returned as if it were good."""
    assert world2[1]["verify"]["off"] == dict(ok=True, differs=True)
    assert world2[0]["verify"]["off"] == dict(ok=True, differs=False)


@pytest.mark.timeout(150)
def test_check_consistency_off_makes_input_errors_local(world2):
    """With ``check_consistency=False`` there is no header round on combine: the bad rank raises
    its ValueError at once and alone; its peer times out naming it (no mismatched collective)."""
    bad = world2[1]["loose_bad_input"]
    assert not bad["ok"] and bad["err"]["types"][0] == "TypeError", bad
    assert "x must have dtype" in bad["err"]["msg"] and bad["elapsed"] < 1.0, bad
    peer = world2[0]["loose_bad_input"]
    assert not peer["ok"] and "CommTimeoutError" in peer["err"]["types"], peer
    assert peer["err"]["ranks"] == [1] and peer["elapsed"] >= 2.0 - 0.05, peer


@pytest.mark.timeout(150)
def test_constructor_disagreement_raises_on_every_rank(world2):
    """Ranks building a Buffer with different num_channels raise at once, before any of them
    creates channel groups (collective; mismatched counts would wait for the group timeout)."""
    for rank in (0, 1):
        got = world2[rank]["ctor_channels"]
        assert not got["ok"] and got["err"]["types"][0] == "ValueError", got
        assert "Buffer: ranks disagree on num_channels: [1, 2]" in got["err"]["msg"], got
        assert got["elapsed"] < 10.0, got
        got = world2[rank]["ctor_default"]  # the default (None) against an explicit count
        assert not got["ok"] and "ranks disagree on num_channels: [None, 2]" in got["err"]["msg"], got
        assert world2[rank]["after_ctor"]
