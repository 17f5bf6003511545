"""``flexep stress``: randomised soak of every mode with verification and an oracle each iteration.

Usage::

    flexep stress                      # 1,000 iterations on 2 local Gloo ranks
    flexep stress --iters 10000        # soak
    flexep stress --world 4 --json     # machine-readable report
    flexep stress --world 4 --ranks-per-node 2   # hierarchical path over 2 virtual nodes
    python -m flexep.stress --iters 200

Every iteration draws, from ``--seed`` and the iteration number (the same on all ranks), a mode
(normal, or low-latency when the Buffer has it), hidden size, dtype (bf16, fp16, fp32, or an FP8
tuple), expert count, top-k, per-rank token counts (0 and 1 included), routing holes (up to all
``-1``), sometimes every token to one rank's experts (incast), expert alignment and whether to
replay the layout with a cached dispatch. Buffers run with ``verify=True`` (per-pair row counts
and checksums after every exchange), and every rank
checks its outputs against :mod:`flexep.reference`, computed from all ranks' inputs, which every
rank regenerates from the seeds:

* dispatch (and cached dispatch): ``recv_x`` (bytes, FP8 scales included), ``recv_topk_idx``,
  ``recv_topk_weights`` and the aligned per-expert counts are exact;
* combine of the dispatched rows equals ``x`` times the number of ranks that received the token
  (exact: inputs are small integers, FP8 compares the dequantised rows), and the combined
  weights equal the input weights on valid slots;
* low-latency: per-expert counts and received rows exact; combine within BF16 tolerance.

The report gives iterations, tokens and bytes moved, mismatches (must be 0) and per-iteration
latency of the communication calls (p50/p99/max over ranks). Exit status 0 iff no mismatch.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch

__all__ = ["main", "Case", "draw_case", "StressConfig"]

FLOATS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class StressConfig:
    iters: int = 1000
    world: int = 2
    seed: int = 0
    low_latency: bool = True
    timeout: float = 60.0
    ranks_per_node: Optional[int] = None  # < world: hierarchical path over virtual nodes


@dataclass(frozen=True)
class Case:
    """One iteration's shape, identical on every rank (drawn from seed and iteration)."""

    mode: str  # "normal" or "ll"
    hidden: int
    kind: str  # "bf16", "fp16", "fp32", "fp8" (normal); LL: "bf16" or "fp8" (use_fp8)
    experts: int
    topk: int
    tokens: tuple  # per rank
    holes: float  # probability of a -1 slot
    alignment: int
    cached: bool
    capacity: int  # LL num_max_dispatch_tokens_per_rank
    round_scale: bool = False
    ue8m0: bool = False
    incast: bool = False  # every token routes only to experts of rank 0 (worst-case receiver)


def draw_case(seed: int, it: int, world: int, low_latency: bool) -> Case:
    """The iteration's case; a pure function of its arguments."""
    rng = random.Random(seed * 1_000_003 + it)
    mode = "ll" if low_latency and rng.random() < 0.25 else "normal"
    experts = world * rng.choice([1, 2, 4, 8])
    topk = rng.randint(1, min(8, experts))
    tokens = tuple(rng.choice([0, 1] + [rng.randint(2, 48)] * 6) for _ in range(world))
    holes = rng.choice([0.0, 0.0, 0.2, 0.5, 1.0])
    incast = rng.random() < 0.1
    if mode == "normal":
        kind = rng.choice(["bf16", "fp16", "fp32", "fp8"])
        hidden = rng.choice([128, 256, 384])
        return Case(mode, hidden, kind, experts, topk, tokens, holes, rng.choice([1, 1, 4, 16]),
                    rng.random() < 0.5, 0, incast=incast)
    kind = rng.choice(["bf16", "fp8"])
    round_scale = kind == "fp8" and rng.random() < 0.5
    ue8m0 = round_scale and rng.random() < 0.5
    hidden = 512 if ue8m0 else rng.choice([128, 256, 512])
    capacity = max(1, max(tokens) + rng.randint(0, 8))
    return Case(mode, hidden, kind, experts, topk, tokens, holes, 1, False, capacity, round_scale, ue8m0,
                incast)


def rank_inputs(case: Case, seed: int, it: int, rank: int):
    """``(x, topk_idx, topk_weights)`` of ``rank``: small-integer x (sums are exact), no repeats."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + it) * 4099 + rank)
    n = case.tokens[rank]
    base = torch.randint(-4, 5, (n, case.hidden), generator=gen).float()
    pool = case.experts // len(case.tokens) if case.incast else case.experts
    idx = torch.rand(n, pool, generator=gen).topk(min(case.topk, pool), dim=1).indices
    idx = torch.cat([idx, idx.new_full((n, case.topk - idx.size(1)), -1)], 1)
    idx[torch.rand(idx.shape, generator=gen) < case.holes] = -1
    weights = torch.rand(n, case.topk, generator=gen)
    if case.mode == "ll":
        return base.bfloat16(), idx.contiguous(), weights
    if case.kind == "fp8":
        from ..quant import per_token_cast_to_fp8
        return per_token_cast_to_fp8(base), idx.contiguous(), weights
    return base.to(FLOATS[case.kind]), idx.contiguous(), weights


# ---- per-iteration checks (run on every rank) ----------------------------------------------
@dataclass
class Tally:
    """What one rank measured."""

    iterations: int = 0
    normal: int = 0
    low_latency: int = 0
    tokens: int = 0
    bytes: int = 0
    mismatched: list = field(default_factory=list)  # iteration numbers
    problems: list = field(default_factory=list)
    latencies: list = field(default_factory=list)
    hierarchical: bool = False
    resources: dict = field(default_factory=dict)  # threads/fds after warm-up and at the end


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """``[T, C]`` of any dtype as ``[T, C * itemsize] uint8``."""
    if t.numel() == 0:  # an empty tensor may carry a 0 stride, which .view(uint8) rejects
        return torch.empty(t.size(0), t.size(1) * t.element_size(), dtype=torch.uint8)
    return t.contiguous().view(torch.uint8)


def _rows_bytes(x) -> torch.Tensor:
    """Each row's bytes (FP8 data and scales side by side) as ``[T, B] uint8``."""
    if isinstance(x, tuple):
        return torch.cat([_bytes(x[0]), _bytes(x[1])], 1)
    return _bytes(x)


def _as_float(x) -> torch.Tensor:
    """Expert input for combine: the rows themselves, or FP8 rows dequantised to bf16."""
    if isinstance(x, tuple):
        from ..quant import per_token_cast_back
        return per_token_cast_back(*x).bfloat16()
    return x


def _sent_bytes(buf) -> int:
    return sum(buf.last_traffic.sent.values())


def _to(t, device: torch.device):
    """``t`` (a tensor, a tuple of tensors or None) on ``device``."""
    if isinstance(t, tuple):
        return tuple(_to(p, device) for p in t)
    return t.to(device) if isinstance(t, torch.Tensor) else t


def _normal_iteration(buf, case: Case, everyone: list, rank: int, tally: Tally,
                      device: Optional[torch.device] = None) -> list[str]:
    """One normal-mode round on ``device``; returns the mismatches found (checked on the host)."""
    from ..layout import aligned_expert_counts
    from ..reference import ref_dispatch

    x, idx, w = everyone[rank]
    device = device or torch.device("cpu")
    dx, didx, dw = _to(x, device), _to(idx, device), _to(w, device)
    problems: list[str] = []
    start = time.perf_counter()
    ntr, _, nte, itr, _ = buf.get_dispatch_layout(didx, case.experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        dx, num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte, topk_idx=didx,
        topk_weights=dw, expert_alignment=case.alignment)
    moved = _sent_bytes(buf)
    cached = None
    if case.cached:
        cached = _to(buf.dispatch(dx, handle=handle)[0], "cpu")
        moved += _sent_bytes(buf)
    out, out_w, _ = buf.combine(_as_float(recv_x), handle, topk_weights=recv_w)
    tally.latencies.append(time.perf_counter() - start)
    tally.bytes += moved + _sent_bytes(buf)
    recv_x, recv_idx, recv_w, itr, out, out_w = _to((recv_x, recv_idx, recv_w, itr, out, out_w), "cpu")

    ref = ref_dispatch([_rows_bytes(e[0]) for e in everyone], [e[1] for e in everyone], case.experts,
                       [e[2] for e in everyone])[rank]
    got = _rows_bytes(recv_x)
    tally.tokens += got.size(0) * (2 if case.cached else 1)
    if not torch.equal(got, ref.recv_x):
        problems.append("dispatch recv_x differs from the oracle")
    if cached is not None and not torch.equal(_rows_bytes(cached), ref.recv_x):
        problems.append("cached dispatch recv_x differs from the oracle")
    if not torch.equal(recv_idx, ref.recv_topk_idx) or not torch.equal(recv_w, ref.recv_topk_weights):
        problems.append("dispatch recv_topk_idx/weights differ from the oracle")
    if counts != aligned_expert_counts(ref.num_recv_tokens_per_expert, case.alignment):
        problems.append(f"per-expert counts {counts} differ from the oracle")
    receivers = itr.sum(1, keepdim=True).float()
    expect = (_as_float(x).float() * receivers).to(out.dtype)
    if not torch.equal(out, expect):
        problems.append("combine(dispatch(x)) != x * receiving ranks")
    if not torch.equal(out_w, torch.where(idx >= 0, w, 0.0)):
        problems.append("combined topk_weights differ from the input weights")
    return problems


def _ll_iteration(buf, case: Case, everyone: list, rank: int, tally: Tally,
                  device: Optional[torch.device] = None) -> list[str]:
    """One low-latency round on ``device``; returns the mismatches found (checked on the host)."""
    from ..quant import per_token_cast_back, per_token_cast_to_fp8
    from ..reference import ref_ll_dispatch
    from ..utils import calc_diff

    x, idx, w = everyone[rank]
    device = device or torch.device("cpu")
    use_fp8 = case.kind == "fp8"
    problems: list[str] = []
    start = time.perf_counter()
    recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(
        _to(x, device), _to(idx, device), case.capacity, case.experts, use_fp8=use_fp8,
        round_scale=case.round_scale, use_ue8m0=case.ue8m0)
    moved = _sent_bytes(buf)
    y = per_token_cast_back(*recv_x).bfloat16() if use_fp8 else recv_x
    out = buf.low_latency_combine(y, _to(idx, device), _to(w, device), handle)[0]
    tally.latencies.append(time.perf_counter() - start)
    tally.bytes += moved + _sent_bytes(buf)
    recv_x, recv_count, out = _to((recv_x, recv_count, out), "cpu")

    ref = ref_ll_dispatch([e[0] for e in everyone], [e[1] for e in everyone], case.experts)[rank]
    if recv_count.tolist() != ref["count"]:
        return [f"LL recv_count {recv_count.tolist()} differs from the oracle {ref['count']}"]
    tally.tokens += int(recv_count.sum())
    for e, n in enumerate(ref["count"]):
        if not n:
            continue
        want = torch.stack(ref["rows"][e])
        if use_fp8:
            want = per_token_cast_back(*per_token_cast_to_fp8(want, case.round_scale, case.ue8m0))
            got = per_token_cast_back(recv_x[0][e, :n], recv_x[1][e, :n])
        else:
            got = recv_x[e, :n]
        if not torch.equal(got, want):
            problems.append(f"LL dispatch rows of local expert {e} differ from the oracle")
    source = per_token_cast_back(*per_token_cast_to_fp8(x.float(), case.round_scale, case.ue8m0)) \
        if use_fp8 else x.float()
    expect = source.bfloat16().float() * torch.where(idx >= 0, w, 0.0).sum(1, keepdim=True)
    if out.numel() and calc_diff(out.float(), expect) > 1e-5:
        problems.append(f"LL combine differs from x * sum(w): calc_diff {calc_diff(out.float(), expect):.2e}")
    return problems


def _worker(rank: int, world: int, device: torch.device, cfg: StressConfig) -> dict:
    import torch.distributed as dist

    from ..buffer import Buffer
    from ..errors import ConservationError

    group = dist.group.WORLD
    buf = Buffer(group, verify=True, timeout=cfg.timeout, ranks_per_node=cfg.ranks_per_node)
    ll_buf = None
    low_latency = cfg.low_latency and hasattr(Buffer, "low_latency_dispatch")
    if low_latency:
        hint = Buffer.get_low_latency_rdma_size_hint(64, 512, world, 8 * world)
        ll_buf = Buffer(group, num_rdma_bytes=hint, low_latency_mode=True, verify=True, timeout=cfg.timeout)
    tally = Tally(hierarchical=buf.hierarchical)
    for it in range(cfg.iters):
        if it == min(10, cfg.iters - 1):  # after warm-up: lazily created threads exist by now
            tally.resources["start"] = _resources()
        case = draw_case(cfg.seed, it, world, low_latency)
        everyone = [rank_inputs(case, cfg.seed, it, r) for r in range(world)]
        try:
            if case.mode == "normal":
                problems = _normal_iteration(buf, case, everyone, rank, tally, device)
                tally.normal += 1
            else:
                problems = _ll_iteration(ll_buf, case, everyone, rank, tally, device)
                tally.low_latency += 1
        except ConservationError as exc:  # verify mode: reported by every rank, buffer still usable
            problems = [f"verify: {exc}"]
        except Exception:
            print(f"flexep stress: rank {rank} raised in iteration {it}: {case}", file=sys.stderr)
            raise
        tally.iterations += 1
        if problems:
            tally.mismatched.append(it)
            if len(tally.problems) < 10:
                tally.problems.append(dict(iteration=it, case=asdict(case), problems=problems))
    tally.resources["end"] = _resources()
    return asdict(tally)


def _resources() -> dict:
    """Live threads and open file descriptors of this process (fds on Linux only, else -1)."""
    import os
    import threading

    fd_dir = "/proc/self/fd"
    return dict(threads=threading.active_count(),
                fds=len(os.listdir(fd_dir)) if os.path.isdir(fd_dir) else -1)


def add_args(ap: argparse.ArgumentParser) -> None:
    """``flexep stress`` options."""
    ap.add_argument("--iters", type=int, default=1000, help="iterations (default 1000; 10000 to soak)")
    ap.add_argument("--world", type=int, default=2, help="local Gloo ranks (default 2; taken from the "
                    "launcher under torchrun)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ll", action="store_true", help="normal mode only")
    ap.add_argument("--timeout", type=float, default=60.0, help="Buffer timeout in seconds")
    ap.add_argument("--ranks-per-node", type=int, default=None,
                    help="virtual node size; below --world, normal mode takes the hierarchical path")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the soak (local Gloo ranks, or the torchrun ranks); print the report; 0 iff no mismatch."""
    from ..launch import WorkerError
    from .common import run_ranks, under_torchrun
    from .stress_report import failure_text, format_report, summarize

    if args.iters < 1 or args.world < 1:
        print(f"flexep stress: error: --iters and --world must be >= 1, got {args.iters} and {args.world}",
              file=sys.stderr)
        return 2
    cfg = StressConfig(args.iters, args.world, args.seed, not args.no_ll, args.timeout, args.ranks_per_node)
    start = time.monotonic()
    tallies = run_ranks(_guarded, cfg.world, (cfg,), timeout=120 + 2.0 * cfg.iters * cfg.world,
                        env={"OMP_NUM_THREADS": "1"})
    if under_torchrun():
        import torch.distributed as dist

        reporter = dist.get_rank() == 0
        dist.destroy_process_group()
        if not reporter:
            return 0
    errors = [WorkerError(f"rank {r} failed:\n{t['error']}") for r, t in enumerate(tallies) if "error" in t]
    if errors:  # an exception other than a verify mismatch: report every rank's, fail
        text = failure_text(errors)
        print(json.dumps(dict(error=text)) if args.json else f"flexep stress: FAILED\n{text}")
        return 1
    rep = summarize(tallies, cfg, time.monotonic() - start)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return 0 if rep["mismatches"] == 0 else 1


def _guarded(rank: int, world: int, device: torch.device, cfg: StressConfig) -> dict:
    """The worker, with an exception reported as its result (so every rank's error is seen)."""
    import traceback

    try:
        return _worker(rank, world, device, cfg)
    except Exception:  # noqa: BLE001 - reported with the rank, then the run fails
        return {"error": traceback.format_exc()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="flexep stress", description=__doc__.split("\n\n")[0])
    add_args(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
