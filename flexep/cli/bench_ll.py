"""Low-latency benchmark: LL dispatch/combine next to normal mode on the same decode tokens.

Reproduce (4 local Gloo ranks, DeepEP's LL benchmark shape: 128 tokens/rank, hidden 7168,
top-8 of 256 experts)::

    flexep bench --mode low-latency
    python -m flexep.bench_low_latency --iters 5 --json bench_ll.json

Correctness is checked first, on every rank: LL dispatch receives exactly the (token, expert)
entries the routing sends to this rank, and LL combine of identity experts gives
``x * sum of the token's valid weights`` (DeepEP's test). Then every iteration times each phase
on all ranks in lockstep (a barrier before each call), phases interleaved so machine noise hits
all of them alike. A phase's time is the slowest rank's, the median over iterations, in µs per
call. "MB sent/rank" is the payload a rank hands to the other ranks (max over ranks): LL moves
its fixed capacity (M rows per peer), normal mode only the routed tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..buffer import Buffer
from ..launch import run_local
from ..quant import per_token_cast_to_fp8
from ..utils import calc_diff

__all__ = ["run_low_latency_bench", "format_table", "main", "run"]

PHASES = (
    ("ll_dispatch_fp8", "LL dispatch FP8"),
    ("ll_dispatch_bf16", "LL dispatch BF16"),
    ("ll_combine", "LL combine BF16"),
    ("ll_hook_send", "LL dispatch FP8, hook: send half"),
    ("ll_hook_recv", "LL dispatch FP8, hook: recv half"),
    ("ll_nocheck_dispatch", "LL dispatch FP8, checks off"),
    ("ll_nocheck_combine", "LL combine BF16, checks off"),
    ("normal_dispatch_bf16", "normal layout+dispatch BF16"),
    ("normal_dispatch_fp8", "normal layout+dispatch FP8"),
    ("normal_combine", "normal combine BF16"),
)


def _inputs(rank: int, num_tokens: int, hidden: int, num_topk: int, num_experts: int):
    """DeepEP-style decode inputs: ``x [T, H] bf16``, top-k of random scores, |randn| weights."""
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    scores = torch.randn(num_tokens, num_experts, generator=gen).abs() + 1
    topk_idx = scores.topk(num_topk, dim=1).indices
    flat = topk_idx.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:10]] = -1  # as DeepEP: 10 unused slots
    weights = torch.randn(num_tokens, num_topk, generator=gen).abs()
    return x, topk_idx, weights


def _timed(fn: Callable, *args, **kwargs):
    dist.barrier()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _payload(buf: Buffer) -> int:
    stats = buf.last_traffic
    return stats.payload["intra"] + stats.payload["inter"]


def _check(rank: int, world: int, buf: Buffer, x, topk_idx, weights, num_experts: int) -> None:
    """Raise unless LL dispatch/combine are right on this rank (see module docstring)."""
    capacity = x.size(0)
    recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(x, topk_idx, capacity, num_experts,
                                                                use_fp8=False)
    gathered = torch.empty(world * topk_idx.numel(), dtype=topk_idx.dtype)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, topk_idx.contiguous().view(-1))
    local = num_experts // world
    expected = torch.bincount(gathered[gathered >= 0], minlength=num_experts)[rank * local:(rank + 1) * local]
    if not torch.equal(recv_count.long(), expected):
        raise RuntimeError(f"LL bench self-check: rank {rank} recv_count {recv_count.tolist()} != "
                           f"{expected.tolist()}")
    combined, _, _ = buf.low_latency_combine(recv_x, topk_idx, weights, handle)
    want = x.float() * weights.masked_fill(topk_idx < 0, 0).sum(1, keepdim=True)
    diff = calc_diff(combined.float(), want)
    if diff > 1e-5:
        raise RuntimeError(f"LL bench self-check: rank {rank} combine calc_diff {diff:.2e} > 1e-5")


def _worker(rank: int, world: int, num_tokens: int, hidden: int, num_topk: int, num_experts: int,
            iters: int, warmup: int) -> dict:
    group = dist.group.WORLD
    size = Buffer.get_low_latency_rdma_size_hint(num_tokens, hidden, world, num_experts)
    buf = Buffer(group, 0, size, low_latency_mode=True)
    fast = Buffer(group, 0, size, low_latency_mode=True, check_consistency=False, validate=False)
    x, topk_idx, weights = _inputs(rank, num_tokens, hidden, num_topk, num_experts)
    x_fp8 = per_token_cast_to_fp8(x)
    _check(rank, world, buf, x, topk_idx, weights, num_experts)
    ll_args = (topk_idx, num_tokens, num_experts)

    def normal_dispatch(x_in):
        lay = buf.get_dispatch_layout(topk_idx, num_experts)
        return buf.dispatch(x_in, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3],
                            num_tokens_per_expert=lay[2], topk_idx=topk_idx, topk_weights=weights)

    times: dict = {k: [] for k, _ in PHASES}
    sent: dict = {}
    for it in range(warmup + iters):
        t = {}
        _, t["ll_dispatch_fp8"] = _timed(buf.low_latency_dispatch, x, *ll_args, use_fp8=True)
        sent["ll_dispatch_fp8"] = _payload(buf)
        res, t["ll_dispatch_bf16"] = _timed(buf.low_latency_dispatch, x, *ll_args, use_fp8=False)
        sent["ll_dispatch_bf16"] = _payload(buf)
        y, handle = res[0], res[2]
        _, t["ll_combine"] = _timed(buf.low_latency_combine, y, topk_idx, weights, handle)
        sent["ll_combine"] = _payload(buf)
        hooked, t["ll_hook_send"] = _timed(buf.low_latency_dispatch, x, *ll_args, return_recv_hook=True)
        _, t["ll_hook_recv"] = _timed(hooked[4])
        # Same routing, so the fast buffer's handle describes the same slots as y's.
        res, t["ll_nocheck_dispatch"] = _timed(fast.low_latency_dispatch, x, *ll_args, use_fp8=True)
        _, t["ll_nocheck_combine"] = _timed(fast.low_latency_combine, y, topk_idx, weights, res[2])
        res, t["normal_dispatch_bf16"] = _timed(normal_dispatch, x)
        sent["normal_dispatch_bf16"] = _payload(buf)
        _, t["normal_dispatch_fp8"] = _timed(normal_dispatch, x_fp8)
        sent["normal_dispatch_fp8"] = _payload(buf)
        _, t["normal_combine"] = _timed(buf.combine, res[0], res[4])
        sent["normal_combine"] = _payload(buf)
        if it >= warmup:
            for k, v in t.items():
                times[k].append(v)
        if rank == 0:
            print(f"[flexep bench low-latency] iteration {it + 1}/{warmup + iters}"
                  f"{' (warm-up)' if it < warmup else ''}", file=sys.stderr, flush=True)
    return dict(times=times, sent=sent)


def _summarise(per_rank: list, config: dict) -> dict:
    """Slowest rank per iteration, median over iterations (µs); bytes: max over ranks."""
    def phase(name):
        return statistics.median(max(v) for v in zip(*[r["times"][name] for r in per_rank])) * 1e6

    sent = {k: max(r["sent"][k] for r in per_rank) for k in per_rank[0]["sent"]}
    return dict(config=config, us_per_call={k: phase(k) for k, _ in PHASES}, bytes_sent_per_rank=sent)


def format_table(summary: dict) -> str:
    """The readable table printed by :func:`run_low_latency_bench`."""
    c, us, sent = summary["config"], summary["us_per_call"], summary["bytes_sent_per_rank"]
    lines = [f"flexep low-latency bench: world {c['world_size']} (Gloo), {c['num_tokens']} tokens/rank, "
             f"hidden {c['hidden']}, top-{c['num_topk']} of {c['num_experts']} experts, "
             f"median of {c['iters']} iterations (slowest rank)",
             f"{'phase':<36}{'us/call':>12}{'MB sent/rank':>14}", "-" * 62]
    for key, label in PHASES:
        nbytes = sent.get(key)
        shown = f"{nbytes / 1e6:>14.2f}" if nbytes is not None else f"{'':>14}"
        lines.append(f"{label:<36}{us[key]:>12.0f}{shown}")
    ll = us["ll_dispatch_fp8"] + us["ll_combine"]
    normal = us["normal_dispatch_fp8"] + us["normal_combine"]
    lines.append(f"LL FP8 dispatch+combine / normal FP8 layout+dispatch+combine: {ll / normal:.2f}x")
    lines.append("LL moves its fixed capacity (M rows per peer) and returns the weighted sum over "
                 "experts; normal mode moves routed tokens only and its combine is unweighted (the "
                 "caller reduces its local experts first).")
    return "\n".join(lines)


def run_low_latency_bench(world_size: int = 4, num_tokens: int = 128, hidden: int = 7168,
                          num_topk: int = 8, num_experts: int = 256, iters: int = 5, warmup: int = 1,
                          json_path: Optional[str] = None) -> dict:
    """Spawn ``world_size`` Gloo ranks, check correctness, time LL and normal mode, print a table.

    Returns the summary dict: ``config``, ``us_per_call`` per phase and ``bytes_sent_per_rank``
    (also written to ``json_path`` when given).
    """
    config = dict(world_size=world_size, num_tokens=num_tokens, hidden=hidden, num_topk=num_topk,
                  num_experts=num_experts, iters=iters, warmup=warmup)
    per_rank = run_local(_worker, world_size, (num_tokens, hidden, num_topk, num_experts, iters, warmup),
                         timeout=1800)
    summary = _summarise(per_rank, config)
    print(format_table(summary), flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flexep.bench_low_latency", description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=4, help="local ranks to spawn (Gloo)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank (= capacity M)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    a = p.parse_args(argv)
    run_low_latency_bench(a.world, a.tokens, a.hidden, a.topk, a.experts, a.iters, a.warmup, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run(a) -> int:
    """``flexep bench --mode low-latency`` with the options ``flexep bench`` parsed."""
    tokens = 128 if a.tokens == 1024 else a.tokens  # the normal-mode default is not a decode batch
    if a.quick:
        tokens, a.hidden = min(tokens, 16), min(a.hidden, 1024)
    run_low_latency_bench(world_size=a.world, num_tokens=tokens, hidden=a.hidden, num_topk=a.topk,
                          num_experts=a.experts, json_path=a.json)
    return 0
