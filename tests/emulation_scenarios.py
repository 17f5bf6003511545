"""Worker side of ``test_emulated_device.py``: flexep's public API on emulated device tensors.

Each scenario runs on every rank of one :func:`emulation.run_emulated` spawn and returns host
copies (explicit ``.cpu()``, outside any guard) for the parent to check against
:mod:`flexep.reference`. Scenarios are isolated: each starts at a store barrier, builds its own
EP group (``new_group`` of the accelerator-only default backend) and its own ``Buffer`` with a
short timeout, and a failure is recorded with its traceback instead of ending the spawn, so one
defect does not hide the checks behind it.

Inputs are built on the host from seeds (:func:`inputs_for`), exactly as the parent rebuilds
them, then moved to the device the way a caller would (``.to(device)``). Shape legend: T tokens
per rank, H hidden, K top-k, E experts, W ranks, L = E / W, M low-latency capacity.
"""

from __future__ import annotations

import inspect
import os
import traceback
import zlib

import emulation as em
import torch
import torch.distributed as dist
from inputs import make_x, routing, weights

import flexep
from flexep import checkpoint
from flexep.eplb import global_placement
from flexep.moe import MoEConfig, MoELayer, fetch_rows, plan_fetch, plan_reduce, reduce_rows
from flexep.quant import per_token_cast_back

TIMEOUT = 20.0  # Buffer(timeout=...): a collective left alone by a failed peer ends this soon
H, M, LL_K = 256, 8, 4  # hidden (FP8 needs a multiple of 128), LL capacity, LL top-k
MOE = MoEConfig(hidden=16, intermediate=24, num_experts=8, topk=3, n_group=4, topk_group=2,
                routed_scaling_factor=2.5, num_shared_experts=1)


# ---- inputs (host) ------------------------------------------------------------------------------
def tokens_for(world: int) -> list:
    """Uneven token counts; the last rank of a 4-rank world has none."""
    return [5 + 3 * r for r in range(world)] if world < 4 else [6, 9, 4, 0]


def inputs_for(name: str, rank: int, world: int, x_kind: str, experts: int, topk: int = 4) -> dict:
    """``x`` (tensor or FP8 tuple), ``topk [T, K]`` with holes, ``w [T, K]`` for one rank."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{rank}/{world}".encode()))
    n = tokens_for(world)[rank]
    idx = routing(gen, n, experts, topk, "holes", world)
    return dict(x=make_x(gen, rank, n, H, x_kind), topk=idx, w=weights(gen, idx))


def ll_inputs(world: int, experts: int, seed: int) -> tuple:
    """Every rank's rank-stamped ``xs [T_r, H] bf16``, ``topk [T_r, K]`` and ``weights [T_r, K]``."""
    g = torch.Generator().manual_seed(seed)
    xs, topk, ws = [], [], []
    for r in range(world):
        n = [M, 3, M - 1, 0][r % 4]
        x = (torch.randn(n, H, generator=g) * 0.5).to(torch.bfloat16)
        x[:, 0], x[:, 1] = r, torch.arange(n)
        idx = torch.stack([torch.randperm(experts, generator=g)[:LL_K] for _ in range(n)]) if n else \
            torch.zeros(0, LL_K, dtype=torch.int64)
        idx[torch.rand(n, LL_K, generator=g) < 0.2] = -1
        xs.append(x)
        topk.append(idx)
        ws.append(torch.rand(n, LL_K, generator=g))
    return xs, topk, ws


def expert_scale(e: int) -> float:
    return 1.0 + (e % 5) / 4


# ---- helpers (worker) ---------------------------------------------------------------------------
def device(kind: str = "cuda") -> torch.device:
    """This rank's emulated device of ``kind``."""
    return em.current_session().resolve(torch.device(kind))


def to_dev(x, dev: torch.device):
    return tuple(t.to(dev) for t in x) if isinstance(x, tuple) else x.to(dev)


def cpu(x):
    """Host copies of tensors in (nested) tuples/lists/dicts; other values unchanged."""
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(cpu(v) for v in x)
    if isinstance(x, dict):
        return {k: cpu(v) for k, v in x.items()}
    return x


def expect_on(dev: torch.device, **outputs) -> None:
    """Every tensor in ``outputs`` (nested tuples allowed, None skipped) is on ``dev``."""
    wrong = []
    for name, value in outputs.items():
        items = value if isinstance(value, (tuple, list)) else [value]
        for i, t in enumerate(items):
            if isinstance(t, torch.Tensor) and t.device != dev:
                wrong.append(f"{name}[{i}] on {t.device}" if len(items) > 1 else f"{name} on {t.device}")
    assert not wrong, f"outputs not on the input device {dev}: {', '.join(wrong)}"


def ep_group(world: int):
    """A fresh accelerator-only group of all ranks (the default backend is the emulated one)."""
    return dist.new_group(list(range(world)))


def plain(x):
    """FP8 tuples dequantised (what a model feeds to combine)."""
    return per_token_cast_back(*x).float() if isinstance(x, tuple) else x


# ---- normal mode --------------------------------------------------------------------------------
def normal(rank: int, world: int, name: str, x_kind: str = "bf16", kind: str = "cuda",
           with_topk: bool = True, **buffer_kw) -> dict:
    """Layout, dispatch, cached dispatch and combine (with weights and a bias) on the device;
    ``with_topk=False`` dispatches without ``topk_idx``/``topk_weights`` (counts travel apart)."""
    experts = 8 * world
    inp = inputs_for(name, rank, world, x_kind, experts)
    dev = device(kind)
    x, topk, w = to_dev(inp["x"], dev), inp["topk"].to(dev), inp["w"].to(dev)
    buf = flexep.Buffer(ep_group(world), timeout=TIMEOUT, explicitly_destroy=True, **buffer_kw)
    n_rank, n_rdma, n_expert, in_rank, _ = buf.get_dispatch_layout(topk, experts)
    expect_on(dev, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
              num_tokens_per_expert=n_expert, is_token_in_rank=in_rank)
    routed = dict(topk_idx=topk, topk_weights=w) if with_topk else {}
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=n_expert, **routed)
    expect_on(dev, recv_x=recv_x, recv_topk_idx=recv_idx, recv_topk_weights=recv_w,
              handle=[handle[i] for i in range(len(handle))])
    cached = buf.dispatch(x, handle=handle)[0]
    y = plain(recv_x)
    bias = torch.ones(topk.size(0), H, dtype=y.dtype, device=dev)
    combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w, bias=bias)
    expect_on(dev, cached=cached, combined=combined, combined_topk_weights=combined_w)
    buf.destroy()
    return cpu(dict(layout=(n_rank, n_expert, in_rank), recv_x=recv_x, recv_idx=recv_idx,
                    recv_w=recv_w, counts=counts, cached=cached, combined=combined,
                    combined_w=combined_w))


def events(rank: int, world: int, kind: str) -> dict:
    """``Buffer.capture()``, ``previous_event``, ``async_finish`` and ``allocate_on_comm_stream``."""
    experts = 8 * world
    inp = inputs_for("events", rank, world, "bf16", experts)
    dev = device(kind)
    x, topk, w = inp["x"].to(dev), inp["topk"].to(dev), inp["w"].to(dev)
    buf = flexep.Buffer(ep_group(world), timeout=TIMEOUT)
    flags = dict(async_finish=True, allocate_on_comm_stream=True)
    *lay, ev = buf.get_dispatch_layout(topk, experts, previous_event=flexep.Buffer.capture(), **flags)
    ev.current_stream_wait()
    recv_x, recv_idx, recv_w, counts, handle, ev = buf.dispatch(
        x, num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1], is_token_in_rank=lay[3],
        num_tokens_per_expert=lay[2], topk_idx=topk, topk_weights=w,
        previous_event=flexep.Buffer.capture(), **flags)
    with ev:  # DeepEP's idiom: overlap something, then wait on exit
        y = recv_x.float()
    combined, _, ev = buf.combine(y, handle, previous_event=flexep.Buffer.capture(), **flags)
    ev.current_stream_wait()
    expect_on(dev, recv_x=recv_x, combined=combined)
    return cpu(dict(recv_x=recv_x, combined=combined))


# ---- low-latency mode ---------------------------------------------------------------------------
def _ll_buffer(world: int, experts: int, **kw) -> flexep.Buffer:
    hint = flexep.Buffer.get_low_latency_rdma_size_hint(M, H, world, experts)
    return flexep.Buffer(ep_group(world), num_rdma_bytes=hint, low_latency_mode=True, timeout=TIMEOUT, **kw)


def _ll_expert_outputs(rank: int, recv_x: torch.Tensor) -> torch.Tensor:
    """Each local expert scales its slots (static shapes: no count is read)."""
    local = recv_x.size(0)
    scale = torch.tensor([expert_scale(rank * local + lo) for lo in range(local)], device=recv_x.device)
    return (recv_x.float() * scale.view(-1, 1, 1)).to(torch.bfloat16)


def _ll_round(rank: int, world: int, buf, x, topk, w, experts: int) -> dict:
    """BF16 dispatch, FP8 dispatch, combine; all through receive hooks."""
    dev = x.device
    recv_x, count, handle, _, hook = buf.low_latency_dispatch(x, topk, M, experts, use_fp8=False,
                                                              return_recv_hook=True)
    hook()
    fp8_x, fp8_count, _, _, hook = buf.low_latency_dispatch(x, topk, M, experts, use_fp8=True,
                                                            return_recv_hook=True)
    hook()
    combined, _, hook = buf.low_latency_combine(_ll_expert_outputs(rank, recv_x), topk, w, handle,
                                                return_recv_hook=True)
    hook()
    expect_on(dev, recv_x=recv_x, recv_count=count, handle=[handle[0], handle[1]], fp8_recv_x=fp8_x,
              fp8_recv_count=fp8_count, combined=combined)
    return dict(recv_x=recv_x, count=count, fp8_x=fp8_x, combined=combined)


def low_latency(rank: int, world: int, kind: str = "cuda", **buffer_kw) -> dict:
    experts = 4 * world
    xs, topk, ws = ll_inputs(world, experts, seed=11)
    dev = device(kind)
    buf = _ll_buffer(world, experts, **buffer_kw)
    return cpu(_ll_round(rank, world, buf, xs[rank].to(dev), topk[rank].to(dev), ws[rank].to(dev), experts))


def ll_no_host_reads(rank: int, world: int) -> dict:
    """With the opt-out checks off, low-latency calls must never read the device from the host."""
    experts = 4 * world
    xs, topk, ws = ll_inputs(world, experts, seed=11)
    dev = device()
    x, t, w = xs[rank].to(dev), topk[rank].to(dev), ws[rank].to(dev)
    buf = _ll_buffer(world, experts, check_consistency=False, validate=False)
    with em.host_reads(forbid=True):
        out = _ll_round(rank, world, buf, x, t, w, experts)
    return cpu(out)


def host_read_counts(rank: int, world: int) -> dict:
    """Host reads per public call, with the default checks and with the opt-out checks off."""
    experts = 8 * world
    inp = inputs_for("reads", rank, world, "bf16", experts)
    dev = device()
    x, topk, w = inp["x"].to(dev), inp["topk"].to(dev), inp["w"].to(dev)
    xs, ll_topk, ll_w = ll_inputs(world, 4 * world, seed=11)
    report = {}
    for label, kw in (("defaults", {}), ("opt_out", dict(check_consistency=False, validate=False))):
        buf = flexep.Buffer(ep_group(world), timeout=TIMEOUT, **kw)
        calls = {}
        with em.host_reads() as log:
            lay = buf.get_dispatch_layout(topk, experts)
        calls["get_dispatch_layout"] = log
        args = dict(num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1], is_token_in_rank=lay[3],
                    num_tokens_per_expert=lay[2], topk_idx=topk, topk_weights=w)
        with em.host_reads() as log:
            buf.dispatch(x, **args)
        calls["first_dispatch"] = log
        with em.host_reads() as log:
            recv_x, _, recv_w, _, handle, _ = buf.dispatch(
                x, num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1], is_token_in_rank=lay[3],
                num_tokens_per_expert=lay[2], topk_idx=topk, topk_weights=w)
        calls["dispatch"] = log
        with em.host_reads() as log:
            buf.dispatch(x, handle=handle)
        calls["cached_dispatch"] = log
        with em.host_reads() as log:
            buf.combine(recv_x, handle, topk_weights=recv_w)
        calls["combine"] = log
        ll = _ll_buffer(world, 4 * world, **kw)
        lx, lt, lw = xs[rank].to(dev), ll_topk[rank].to(dev), ll_w[rank].to(dev)
        with em.host_reads() as log:
            res = ll.low_latency_dispatch(lx, lt, M, 4 * world, use_fp8=False)
        calls["low_latency_dispatch"] = log
        with em.host_reads() as log:
            ll.low_latency_combine(_ll_expert_outputs(rank, res[0]), lt, lw, res[2])
        calls["low_latency_combine"] = log
        report[label] = {call: (log.count, log.by_kind(), log.report()) for call, log in calls.items()}
    return report


# ---- autograd, MoE layer, checkpoint ------------------------------------------------------------
AG_EXPERTS, AG_H, AG_T, AG_K = 16, 8, 6, 3


def autograd_inputs(rank: int) -> tuple:
    gen = torch.Generator().manual_seed(1234 + rank)
    topk = torch.rand(AG_T, AG_EXPERTS, generator=gen).topk(AG_K, 1).indices
    topk[0, -1] = -1
    x = torch.randn(AG_T, AG_H, generator=gen, dtype=torch.float64)
    w = torch.rand(AG_T, AG_K, generator=gen)
    g = torch.randn(AG_T, AG_H, generator=gen, dtype=torch.float64)
    return topk, x, w, g


def autograd_backward(rank: int, world: int, kind: str = "npu", **buffer_kw) -> dict:
    """``loss = <g, combine(dispatch(x) * (1 + sum(recv_w)))>``; gradients of x and w."""
    dev = device(kind)
    topk, x, w, g = (t.to(dev) for t in autograd_inputs(rank))
    x.requires_grad_(True)
    w.requires_grad_(True)
    buf = flexep.Buffer(ep_group(world), timeout=TIMEOUT, **buffer_kw)
    recv_x, _, recv_w, _, handle = flexep.autograd.dispatch(buf, x, topk, w, AG_EXPERTS)
    expect_on(dev, recv_x=recv_x, recv_topk_weights=recv_w)
    y = recv_x * (1.0 + recv_w.double().sum(1, keepdim=True))
    loss = (flexep.autograd.combine(buf, y, handle) * g).sum()
    loss.backward()
    expect_on(dev, grad_x=x.grad, grad_w=w.grad)
    return cpu(dict(grad_x=x.grad, grad_w=w.grad))


def _moe_tokens(rank: int) -> torch.Tensor:
    return torch.randn(5, MOE.hidden, generator=torch.Generator().manual_seed(100 + rank))


def moe_forward(rank: int, world: int) -> dict:
    """The layer on the device against the same layer on the host (Gloo), normal and LL."""
    dev = device()
    x = _moe_tokens(rank)
    host = dist.new_group(list(range(world)), backend="gloo")
    hint = flexep.Buffer.get_low_latency_rdma_size_hint(8, MOE.hidden, world, MOE.num_experts)
    out = {}
    for mode, kw in (("normal", {}), ("low_latency", dict(num_rdma_bytes=hint, low_latency_mode=True))):
        ref = MoELayer(MOE, flexep.Buffer(host, timeout=TIMEOUT, **kw), seed=7,
                       num_max_dispatch_tokens_per_rank=8)
        layer = MoELayer(MOE, flexep.Buffer(ep_group(world), timeout=TIMEOUT, **kw), seed=7,
                         num_max_dispatch_tokens_per_rank=8).to(dev)
        expect_on(dev, **dict(layer.named_parameters()), **dict(layer.named_buffers()))
        with torch.no_grad():
            y = layer(x.to(dev), low_latency=mode == "low_latency")
            y_ref = ref(x, low_latency=mode == "low_latency")
        expect_on(dev, y=y)
        out[mode] = (y.cpu(), y_ref)
    return out


def weight_rows(rank: int, world: int) -> tuple:
    """Rank's rows ``[4, 3]`` (ids ``10 * rank + j``), a fetch and a reduce asking the next rank."""
    rows = torch.arange(12.0).view(4, 3) + 100 * rank
    peer = (rank + 1) % world
    fetch = ([10 * rank + j for j in range(4)], [10 * peer + 1, 10 * rank + 2, 10 * peer + 1],
             [peer, rank, peer])
    reduce = ([10 * peer, 10 * peer, 10 * rank + 3], [peer, peer, rank], torch.full((3, 3), rank + 1.0))
    return rows, fetch, reduce


def weights_and_rebalance(rank: int, world: int) -> dict:
    """fetch/reduce of device rows and a layer's placement change, without reading the device."""
    dev = device()
    comm = flexep.Buffer(ep_group(world), timeout=TIMEOUT).comm
    rows, (ids, want, owners), (contrib_ids, c_owners, contrib) = weight_rows(rank, world)
    rows, contrib = rows.to(dev), contrib.to(dev)
    with em.host_reads(forbid=True):
        fetched = fetch_rows(comm, rows, plan_fetch(comm, ids, want, owners))
        reduced = reduce_rows(comm, rows, contrib, plan_reduce(comm, ids, contrib_ids, c_owners))
    expect_on(dev, fetched=fetched, reduced=reduced)
    layer = MoELayer(MOE, flexep.Buffer(ep_group(world), timeout=TIMEOUT), seed=7,
                     slotwise_combine=True).to(dev)
    x = _moe_tokens(rank).to(dev)
    placement = global_placement(torch.tensor([30.0, 1, 2, 9, 1, 1, 12, 1]), 12, world)
    with torch.no_grad():
        before = layer(x)
        with em.host_reads(forbid=True):
            moved = layer.apply_placement(placement)
        after = layer(x)
    expect_on(dev, **dict(layer.named_parameters()), **dict(layer.named_buffers()))
    return cpu(dict(fetched=fetched, reduced=reduced, before=before, after=after, moved=moved.rows,
                    ids=layer.experts.logical_ids))


def checkpoint_round_trip(rank: int, world: int, root: str) -> dict:
    """Save a perturbed layer from the device, load it into another device layer."""
    dev = device()
    group = ep_group(world)
    src = MoELayer(MOE, flexep.Buffer(group, timeout=TIMEOUT), seed=1).to(dev)
    gen = torch.Generator().manual_seed(1001)
    with torch.no_grad():
        for p in src.parameters():  # the same noise on every rank for replicated tensors
            p.add_(torch.randn(p.shape, generator=gen).to(dev) * 0.05)
    x = _moe_tokens(rank).to(dev)
    with torch.no_grad():
        y_src = src(x, low_latency=False)
    path = os.path.join(root, "ckpt")
    checkpoint.save(src, path, group)
    dst = MoELayer(MOE, flexep.Buffer(group, timeout=TIMEOUT), seed=99).to(dev)
    checkpoint.load(dst, path)
    expect_on(dev, **dict(dst.named_parameters()), **dict(dst.named_buffers()))
    with torch.no_grad():
        y_dst = dst(x, low_latency=False)
    return cpu(dict(y_src=y_src, y_dst=y_dst))


# ---- harness checks that need a process group ---------------------------------------------------
def group_refuses_host_tensors(rank: int, world: int) -> dict:
    """The emulated group moves device tensors and refuses host tensors, like NCCL."""
    dev = device()
    group = ep_group(world)
    out = {}
    got = torch.empty(world, dtype=torch.int64, device=dev)
    dist.all_to_all_single(got, torch.full((world,), rank, device=dev), group=group)
    out["all_to_all_single"] = got.cpu()
    refused = {}
    with em.expected_errors():
        for op, call in (("all_reduce", lambda: dist.all_reduce(torch.ones(2), group=group)),
                         ("all_to_all_single", lambda: dist.all_to_all_single(
                             torch.empty(world), torch.ones(world), group=group)),
                         ("all_gather_into_tensor", lambda: dist.all_gather_into_tensor(
                             torch.empty(world), torch.ones(1), group=group)),
                         ("npu tensor on a cuda group", lambda: dist.all_reduce(
                             torch.ones(2, device=device("npu")), group=group))):
            try:
                call()
                refused[op] = None
            except em.NotOnDeviceError as exc:
                refused[op] = str(exc)
    out["refused"] = refused
    side = dist.new_group(list(range(world)), backend="gloo")  # a CPU control plane stays legal
    total = torch.ones(1)
    dist.all_reduce(total, group=side)
    out["gloo_side_group"] = total
    return out


class _Scale(torch.autograd.Function):
    """A custom Function whose backward allocates on the device (outside the factory mode)."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        ones = torch.ones(grad.shape, dtype=grad.dtype, device=grad.device)
        steps = torch.arange(grad.size(0), device=grad.device).to(grad.dtype).unsqueeze(1)
        return grad * 2 * ones + 0 * steps


def npu_route(rank: int, world: int, kind: str = "npu") -> dict:
    """The npu route of the harness: backward with device allocations, its synchronous device
    module (a synchronize is a host sync), and PyTorch's own indexing on npu tensors."""
    dev = device(kind)
    x = torch.arange(6.0, device=dev).view(3, 2).requires_grad_(True)
    _Scale.apply(x).sum().backward()
    expect_on(dev, grad=x.grad)
    with em.host_reads() as log:
        torch.npu.synchronize()
        torch.npu.current_stream().wait_event(torch.npu.Event())
    picked = x.detach()[torch.tensor([2, 0], device=dev)]
    expect_on(dev, picked=picked)
    return dict(grad=x.grad.cpu(), reads=log.by_kind(), picked=picked.cpu(),
                available=(torch.npu.is_available(), torch.cuda.is_available()))


# ---- the scenario runner ------------------------------------------------------------------------
def _device_type(fn, kwargs: dict) -> str:
    """The ``kind`` a scenario runs on (its argument, else its default, else ``cuda``)."""
    param = inspect.signature(fn).parameters.get("kind")
    return kwargs.get("kind") or (param.default if param is not None else "cuda")


def run_scenarios(rank: int, world: int, scenarios: dict) -> dict:
    """Run ``{name: (fn, kwargs)}`` in order; ``{name: ("ok", value) | ("error", traceback)}``.

    A scenario runs with its device type primary (:meth:`emulation.Session.use`), so the groups
    it and the library create are bound to that type, as an HCCL group is to ``npu``.
    """
    session = em.current_session()
    out, stuck = {}, None
    for name, (fn, kwargs) in scenarios.items():
        if stuck is None:
            try:
                em.sync_point(f"scenario/{name}", timeout=3 * TIMEOUT)
            except RuntimeError as exc:  # a rank never left an earlier scenario: stop here
                stuck = f"not run: {exc} (a rank is stuck in an earlier scenario)"
        if stuck is not None:
            out[name] = ("error", stuck)
            continue
        try:
            with session.use(_device_type(fn, kwargs)):
                value = fn(rank, world, **kwargs)
            em.check_clean(session, f"scenario {name}")
            out[name] = ("ok", value)
        except Exception as exc:  # noqa: BLE001 - recorded for the parent, which fails the test
            first = session.errors[0] if session.errors else exc
            text = traceback.format_exc()
            if first is not exc:  # an earlier device error, caught and masked by the code under test
                text += f"\nthe scenario's first emulation error (caught on the way):\n{first}"
            out[name] = ("error", text)
            session.errors.clear()
    return out

