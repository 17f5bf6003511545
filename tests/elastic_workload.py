"""A served decode workload with injected faults, for the elastic tests (spawned ranks).

``REQUESTS`` requests each generate ``STEPS`` tokens: a token is a ``[H]`` vector and the next
one is ``rms_norm(moe(token))`` (the toy model of ``examples/serve_decode.py``). Requests are
owned in contiguous blocks by EP rank; every generated token is posted to a **frontend** in the
launcher's store (it outlives the workers, like an API server that streams tokens to clients),
so a request whose owner died continues on its new owner from its last posted token. One
iteration = every rank advances its unfinished requests by one token, then all agree on what
remains (one small gather). Iterations run under :meth:`ElasticEP.run`, so a failing iteration is
re-run on the new group.

Faults (``spec["faults"]``, each ``dict(member, iteration, phase, nth, action)``) fire inside the
flexep call at ``phase`` of the ``nth`` occurrence in that iteration: ``kill`` (SIGKILL self),
``exit`` (``os._exit``), ``stop`` (SIGSTOP self; the first survivor to form a new group sends
SIGCONT, so the victim wakes after being excluded, gets ``StaleGenerationError`` and rejoins).
Phase ``before_recv_hook`` lies between a low-latency dispatch's send and its receive hook;
phase ``timer`` fires ``delay`` seconds after the iteration starts, wherever the process is then
(inside a call, in the agreement, while a new group forms or weights move).

The oracle (:func:`oracle`) is the same decode at EP size 1 in one process: with
``slotwise_combine`` every token is bitwise independent of EP size, placement and batch.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F

from flexep import Buffer
from flexep.elastic import ElasticEP, ElasticMoE, TokenStreams
from flexep.errors import StaleGenerationError
from flexep.moe import MoEConfig, MoELayer
from flexep.moe.eplb import Placement, global_placement

CFG = MoEConfig(hidden=16, intermediate=24, num_experts=8, topk=3, n_group=4, topk_group=2,
                routed_scaling_factor=2.5, num_shared_experts=1)
REQUESTS, STEPS, CAPACITY, SEED = 12, 6, 12, 3
LOAD = torch.tensor([9.0, 1, 4, 2, 7, 1, 3, 5])  # expert loads for placements


def prompt(i: int) -> torch.Tensor:
    return torch.randn(CFG.hidden, generator=torch.Generator().manual_seed(100 + i))


def initial_placement(world: int, redundant: int) -> Placement:
    if redundant == 0 and CFG.num_experts % world == 0:
        return Placement.identity(CFG.num_experts, world)
    return global_placement(LOAD, -(-(CFG.num_experts + redundant) // world) * world, world)


def layer_for(group, mode: str, placement: Placement, hook=None, **buffer_kwargs) -> MoELayer:
    ll = mode == "ll"
    hint = Buffer.get_low_latency_rdma_size_hint(CAPACITY, CFG.hidden, group.size(),
                                                 placement.num_physical) if ll else 0
    buf = Buffer(group, num_rdma_bytes=hint, low_latency_mode=ll, _fault_hook=hook, **buffer_kwargs)
    if hook is not None and ll:
        _hook_between_send_and_receive(buf, hook)
    return MoELayer(CFG, buf, placement=placement, seed=SEED, slotwise_combine=True,
                    num_max_dispatch_tokens_per_rank=CAPACITY)


def _hook_between_send_and_receive(buf: Buffer, hook) -> None:
    """Make the layer's low-latency dispatch use a receive hook, with a fault point before it."""
    send = buf.low_latency_dispatch

    def dispatch(*args, **kwargs):
        recv_x, count, handle, event, receive = send(*args, **{**kwargs, "return_recv_hook": True})
        hook("before_recv_hook")
        receive()
        return recv_x, count, handle, event, lambda: None
    buf.low_latency_dispatch = dispatch


def owned(rank: int, world: int) -> list[int]:
    """Requests of EP rank ``rank``: contiguous blocks (the driver re-assigns on every change)."""
    return torch.tensor_split(torch.arange(REQUESTS), world)[rank].tolist()


def decode_iteration(ep: ElasticEP, moe: ElasticMoE, frontend: TokenStreams, cache: dict, mode: str) -> int:
    """Advance this rank's unfinished requests by one token; return the tokens left (all ranks)."""
    if cache.get("generation") != ep.generation:  # ownership may have moved: re-read the frontend
        cache.clear()
        cache["generation"] = ep.generation
    state = {}
    for i in owned(ep.rank, ep.world):
        if i not in cache:
            n = frontend.count(i)
            cache[i] = (n, frontend.token(i, n - 1) if n else prompt(i))
        state[i] = cache[i]
    todo = [i for i, (n, _) in state.items() if n < STEPS]
    x = torch.stack([state[i][1] for i in todo]) if todo else torch.zeros(0, CFG.hidden)
    with torch.no_grad():
        y = F.rms_norm(moe(x, low_latency=mode == "ll"), (CFG.hidden,))
    for i, token in zip(todo, y):
        n = state[i][0]
        cache[i] = (n + 1, frontend.post(i, n, token))
    left = sum(STEPS - cache[i][0] for i in state)
    return sum(v[0] for v in ep.gather([left]))


class Faults:
    """The fault hook of every Buffer this process builds (see the module docstring)."""

    def __init__(self, member: int, faults: list, store) -> None:
        self.member, self.store, self.iteration = member, store, -1
        self.faults = [f for f in faults if f["member"] == member]
        self.seen: Counter = Counter()

    def __call__(self, phase: str) -> None:
        for f in self.faults:
            if f["iteration"] != self.iteration or f["phase"] != phase:
                continue
            self.seen[self.iteration, phase] += 1
            if self.seen[self.iteration, phase] == f.get("nth", 1):
                self.act(f["action"])

    def arm(self, iteration: int) -> None:
        """Start the iteration: set timers for its ``timer`` faults."""
        self.iteration = iteration
        for f in self.faults:
            if f["iteration"] == iteration and f["phase"] == "timer":
                threading.Timer(f["delay"], self.act, (f["action"],)).start()

    def act(self, action: str) -> None:
        self.store.set(f"test/fault_time/{self.member}", repr(time.time()))
        if action == "exit":
            os._exit(0)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "stop":
            self.store.set(f"test/stopped/{self.member}", str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)


def _wake_stopped(ep: ElasticEP, spec: dict) -> None:
    """After a new generation forms, its rank 0 wakes the frozen victims (once each)."""
    if ep.rank != 0:
        return
    for f in spec["faults"]:
        key = f"test/stopped/{f['member']}"
        if f["action"] == "stop" and ep.store.check([key]) and ep.store.add(key + "/woken", 1) == 1:
            os.kill(int(ep.store.get(key)), signal.SIGCONT)


def serve_worker(rank: int, world: int, spec: dict) -> dict:
    """Run the workload as member ``rank`` (a replacement when ``rank >= world``)."""
    atexit.register(os._exit, 0)  # skip interpreter teardown: abandoned groups would wait in it
    if rank < world:
        dist.barrier()  # start-up skew never counts against the short timeouts below
    mode, timeout = spec["mode"], spec.get("timeout", 3.0)
    ep = ElasticEP(timeout=timeout, ranks_per_node=spec.get("ranks_per_node"),
                   node=spec.get("joiner_node"))
    faults = Faults(rank, spec.get("faults", []), ep.store)

    def build(gen, placement):
        return layer_for(gen.group, mode, placement, faults, **gen.buffer_kwargs())

    moe = ElasticMoE(ep, build, initial_placement(world, spec.get("redundant", 0)), load=LOAD,
                     policy=spec.get("policy", "rerun"), checkpoint=spec.get("checkpoint"))
    ep.on_change(lambda gen: _wake_stopped(ep, spec))
    frontend, cache, excluded, masks = TokenStreams(ep.store, REQUESTS, STEPS, CFG.hidden), {}, [], {}
    left = int(ep.join(timeout=120, cancel=frontend.done))  # 0: finished before it was admitted
    iteration = 0
    while left:
        faults.arm(iteration)
        if iteration in spec.get("restore_at", ()):
            moe.restore()
        moe.policy = spec.get("policy_at", {}).get(iteration, moe.policy)
        try:
            left = ep.run(lambda: decode_iteration(ep, moe, frontend, cache, mode))
            masks[iteration] = (sorted(moe.masked), moe.policy)
            # wait_joiners[i] = n: from iteration i on, n joiners must have been admitted in all.
            wait = spec.get("wait_joiners", {}).get(iteration, 0) - ep.gen.membership.admitted
            ep.run(lambda: ep.admit(min_joiners=max(0, wait), timeout=60))  # noqa: B023 - called at once
        except StaleGenerationError as exc:
            excluded.append(str(exc))
            if not ep.rejoin(timeout=120, cancel=frontend.done):
                break  # the others finished every request without it
            cache.clear()
        iteration += 1
    ep.leave()
    keys = {f["member"]: f"test/fault_time/{f['member']}" for f in spec.get("faults", [])}
    if not ep.is_member:
        return dict(member=ep.member, excluded=excluded, is_member=False)
    return dict(member=ep.member, tokens=frontend.tokens(), generation=ep.generation, world=ep.world,
                is_member=True,
                history=[c.__dict__ for c in ep.history], excluded=excluded, masks=masks,
                fault_times={m: float(ep.store.get(k)) for m, k in keys.items() if ep.store.check([k])})


def oracle(mode: str, masks: dict = None) -> torch.Tensor:
    """``[REQUESTS, STEPS, H]`` the fault-free tokens, decoded at EP size 1 in this process
    (needs an initialised one-rank default group). ``masks[n] = (experts, policy)``: token n is
    decoded with those experts unavailable under that policy."""
    layer = layer_for(dist.group.WORLD, mode, initial_placement(1, 0))
    tokens = torch.empty(REQUESTS, STEPS, CFG.hidden)
    x = torch.stack([prompt(i) for i in range(REQUESTS)])
    with torch.no_grad():
        for n in range(STEPS):
            experts, policy = (masks or {}).get(n, ([], "rerun"))
            layer.set_unavailable(experts, renormalize=policy == "renormalize")
            x = F.rms_norm(layer(x, low_latency=mode == "ll"), (CFG.hidden,))
            tokens[:, n] = x
    return tokens


def shrink_inputs(member: int) -> torch.Tensor:
    """``[4, H]`` the tokens member ``member`` decodes at every step of :func:`shrink_worker`."""
    return torch.randn(4, CFG.hidden, generator=torch.Generator().manual_seed(500 + member))


def shrink_worker(rank: int, world: int, spec: dict) -> dict:
    """Low-latency steps on shrink-mode Buffers (``enable_shrink=True``) through
    :meth:`ElasticMoE.run`: a lost peer is masked inside the step (DeepEP's semantics) and the
    membership changes after it. Returns this member's output and masked experts per step."""
    atexit.register(os._exit, 0)
    dist.barrier()
    ep = ElasticEP(timeout=spec["timeout"])
    faults = Faults(rank, spec["faults"], ep.store)

    def build(gen, placement):
        hint = Buffer.get_low_latency_rdma_size_hint(CAPACITY, CFG.hidden, gen.world, placement.num_physical)
        buf = Buffer(gen.group, num_rdma_bytes=hint, low_latency_mode=True, enable_shrink=True,
                     _fault_hook=faults, **gen.buffer_kwargs())
        return MoELayer(CFG, buf, placement=placement, seed=SEED, slotwise_combine=True,
                        num_max_dispatch_tokens_per_rank=CAPACITY)

    moe = ElasticMoE(ep, build, initial_placement(world, 0), load=LOAD, policy=spec["policy"],
                     checkpoint=spec["checkpoint"])
    ep.join()
    x, outs, masks = shrink_inputs(rank), [], []
    for step in range(spec["steps"]):
        faults.arm(step)
        moe.policy = spec.get("policy_at", {}).get(step, moe.policy)
        with torch.no_grad():
            outs.append(moe.run(lambda: moe(x, low_latency=True)))
        masks.append(sorted(moe.masked))
    ep.leave()
    return dict(member=ep.member, outs=outs, masks=masks, world=ep.world,
                history=[c.__dict__ for c in ep.history])


def shrink_oracle(member: int, masks: list) -> list:
    """The single-process low-latency decode of :func:`shrink_inputs` with those experts masked."""
    layer = layer_for(dist.group.WORLD, "ll", initial_placement(1, 0))
    outs = []
    with torch.no_grad():
        for masked in masks:
            layer.set_unavailable(masked)
            outs.append(layer(shrink_inputs(member), low_latency=True))
    return outs
