"""``flexep bench``: normal-mode dispatch/combine on DeepSeek-V3-shaped traffic.

Reproduce the README table (4 local Gloo ranks, 1024 tokens per rank)::

    flexep bench --world 4 --tokens 1024 --json bench.json

Every iteration times, on every rank and in the same process group, interleaved so machine
noise hits all of them alike:

* flexep ``get_dispatch_layout``, ``dispatch`` and ``combine``;
* raw ``all_to_all_single`` moving exactly the bytes flexep's dispatch and combine sent
  (buffers prepared in advance: the floor for any algorithm on this transport);
* a naive per-(token, expert) exchange that sends one copy per chosen expert and reduces on
  return, as Megatron's all-to-all token dispatcher does.

A phase's time is the slowest rank's (the exchange is as slow as its slowest member), the median
over iterations. Correctness is checked before timing. Under ``torchrun`` the same code runs on
the launched ranks instead of spawning local ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .buffer import Buffer
from .launch import init_from_env, run_local

__all__ = ["BenchConfig", "run_bench", "main", "format_table"]


@dataclass(frozen=True)
class BenchConfig:
    """Shape of the benchmark traffic and how to run it."""

    world: int = 4
    tokens: int = 1024
    hidden: int = 7168
    experts: int = 256
    topk: int = 8
    iters: int = 5
    warmup: int = 1
    ranks_per_node: Optional[int] = None
    hierarchical: bool = True
    channels: int = 1
    fp8: bool = False
    seed: int = 0


def _routing(cfg: BenchConfig, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    scores = torch.rand(cfg.tokens, cfg.experts, generator=gen) + 1e-3
    topk_w, topk_idx = scores.topk(cfg.topk, dim=1)
    x = torch.randn(cfg.tokens, cfg.hidden, generator=gen).to(torch.bfloat16)
    return x, topk_idx, topk_w.float()


def _timed(fn, *args):
    """``fn(*args)`` and its wall time, all ranks starting together."""
    dist.barrier()
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _naive(buf_group, x, topk_idx, topk_w, experts, rank, world):
    """Megatron-style: one row per (token, expert), exchanged, then weighted-reduced on return."""
    local = experts // world
    flat = topk_idx.flatten()
    valid = (flat >= 0).nonzero().squeeze(1)
    order = valid[torch.argsort(flat[valid], stable=True)]
    token_of = order // topk_idx.size(1)
    send_counts = torch.bincount(flat[order] // local, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=buf_group)
    sc, rc = send_counts.tolist(), recv_counts.tolist()
    send = x.index_select(0, token_of)
    recv = x.new_empty(sum(rc), x.size(1))
    dist.all_to_all_single(recv, send, rc, sc, group=buf_group)
    back = x.new_empty(send.shape)
    dist.all_to_all_single(back, recv, sc, rc, group=buf_group)
    out = torch.zeros(x.shape, dtype=torch.float32)
    out.index_add_(0, token_of, back.float() * topk_w.flatten()[order].unsqueeze(1))
    return out.to(x.dtype), sum(sc) * x.size(1) * x.element_size()


def _bench_worker(rank: int, world: int, cfg: BenchConfig) -> dict:
    group = dist.group.WORLD
    buf = Buffer(group, ranks_per_node=cfg.ranks_per_node, hierarchical=cfg.hierarchical,
                 num_channels=cfg.channels, explicitly_destroy=True)
    x, topk_idx, topk_w = _routing(cfg, rank)
    x_in = x
    if cfg.fp8:
        from .quant import per_token_cast_to_fp8
        x_in = per_token_cast_to_fp8(x.float())

    def layout():
        return buf.get_dispatch_layout(topk_idx, cfg.experts)

    def dispatch(lay):
        return buf.dispatch(x_in, num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1],
                            is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                            topk_idx=topk_idx, topk_weights=topk_w)

    # Correctness first: combine(dispatch(x)) is x times the number of ranks that got it.
    lay = layout()
    recv = dispatch(lay)
    recv_x = recv[0] if not cfg.fp8 else recv[0][0].float().to(torch.bfloat16)
    combined, _, _ = buf.combine(recv_x if not cfg.fp8 else _dequant(recv[0]), recv[4])
    if not cfg.fp8:
        expect = x.float() * lay[3].sum(1, keepdim=True)
        if not torch.allclose(combined.float(), expect, rtol=2e-2, atol=2e-2):
            raise RuntimeError(f"bench self-check failed on rank {rank}")
    d_bytes = dict(buf.last_traffic.payload)

    times: dict = {k: [] for k in ("layout", "dispatch", "combine", "raw_dispatch", "raw_combine",
                                   "naive")}
    traffic = {}
    for it in range(cfg.warmup + cfg.iters):
        lay, t_layout = _timed(layout)
        res, t_dispatch = _timed(dispatch, lay)
        traffic["dispatch"] = _stats(buf)
        handle = res[4]
        y = res[0] if not cfg.fp8 else _dequant(res[0])
        _, t_combine = _timed(buf.combine, y, handle)
        traffic["combine"] = _stats(buf)
        # Raw all_to_all_single of the same payload, buffers prepared outside the timing.
        send_counts = [int(v) for v in handle.send_counts]
        recv_counts = [int(v) for v in handle.recv_counts]
        row = x.size(1) * (1 if cfg.fp8 else 2) + _meta_bytes(cfg)
        send = torch.empty(sum(send_counts), row, dtype=torch.uint8)
        recv_buf = torch.empty(sum(recv_counts), row, dtype=torch.uint8)
        _, t_raw_d = _timed(dist.all_to_all_single, recv_buf, send, recv_counts, send_counts)
        back_src = torch.empty(sum(recv_counts), x.size(1) * 2, dtype=torch.uint8)
        back_dst = torch.empty(sum(send_counts), x.size(1) * 2, dtype=torch.uint8)
        _, t_raw_c = _timed(dist.all_to_all_single, back_dst, back_src, send_counts, recv_counts)
        (_, naive_bytes), t_naive = _timed(_naive, group, x, topk_idx, topk_w, cfg.experts,
                                           rank, world)
        if it >= cfg.warmup:
            for k, v in zip(times, (t_layout, t_dispatch, t_combine, t_raw_d, t_raw_c, t_naive)):
                times[k].append(v)
        if rank == 0:
            print(f"[flexep bench] iteration {it + 1}/{cfg.warmup + cfg.iters}"
                  f"{' (warm-up)' if it < cfg.warmup else ''}", file=sys.stderr, flush=True)
    buf.destroy()
    return dict(times=times, traffic=traffic, naive_bytes=naive_bytes, check_bytes=d_bytes)


def _dequant(x):
    from .quant import per_token_cast_back
    return per_token_cast_back(*x).to(torch.bfloat16)


def _meta_bytes(cfg: BenchConfig) -> int:
    """Per-row metadata flexep's dispatch moves: source index, top-k ids and weights, scales."""
    return 4 + cfg.topk * 12 + (cfg.hidden // 128 * 4 if cfg.fp8 else 0)


def _stats(buf: Buffer) -> dict:
    t = buf.last_traffic
    return dict(sent=dict(t.sent), payload=dict(t.payload), minimum=dict(t.minimum))


def _summarise(cfg: BenchConfig, per_rank: list) -> dict:
    """Slowest rank per iteration, median over iterations; bytes per rank (max over ranks)."""
    def phase(name):
        per_iter = list(zip(*[r["times"][name] for r in per_rank]))
        return statistics.median(max(v) for v in per_iter)

    t = {k: phase(k) for k in per_rank[0]["times"]}
    off = ("intra", "inter")
    d_sent = max(sum(r["traffic"]["dispatch"]["payload"][k] for k in off) for r in per_rank)
    c_sent = max(sum(r["traffic"]["combine"]["payload"][k] for k in off) for r in per_rank)
    d_min = sum(sum(r["traffic"]["dispatch"]["minimum"][k] for k in off) for r in per_rank)
    d_tot = sum(sum(r["traffic"]["dispatch"]["payload"][k] for k in off) for r in per_rank)
    c_min = sum(sum(r["traffic"]["combine"]["minimum"][k] for k in off) for r in per_rank)
    c_tot = sum(sum(r["traffic"]["combine"]["payload"][k] for k in off) for r in per_rank)
    naive = max(r["naive_bytes"] for r in per_rank)
    ours = t["dispatch"] + t["combine"]
    raw = t["raw_dispatch"] + t["raw_combine"]
    return dict(config=asdict(cfg), times_s=t, dispatch_bytes_per_rank=d_sent,
                combine_bytes_per_rank=c_sent, dispatch_vs_minimum=d_tot / d_min if d_min else 1.0,
                combine_vs_minimum=c_tot / c_min if c_min else 1.0, naive_bytes_per_rank=naive,
                ratio_vs_raw=ours / raw, ratio_vs_naive=ours / t["naive"],
                traffic=[r["traffic"] for r in per_rank])


def format_table(s: dict) -> str:
    t = s["times_s"]
    rows = [
        ("layout", t["layout"], 0, None),
        ("dispatch", t["dispatch"], s["dispatch_bytes_per_rank"], s["dispatch_vs_minimum"]),
        ("combine", t["combine"], s["combine_bytes_per_rank"], s["combine_vs_minimum"]),
        ("dispatch+combine", t["dispatch"] + t["combine"],
         s["dispatch_bytes_per_rank"] + s["combine_bytes_per_rank"], None),
        ("raw all_to_all (same bytes)", t["raw_dispatch"] + t["raw_combine"],
         s["dispatch_bytes_per_rank"] + s["combine_bytes_per_rank"], None),
        ("naive per-(token,expert)", t["naive"], 2 * s["naive_bytes_per_rank"], None),
    ]
    c = s["config"]
    lines = [f"flexep bench: world {c['world']}, {c['tokens']} tokens/rank, hidden {c['hidden']}, "
             f"top-{c['topk']} of {c['experts']} experts, {'FP8' if c['fp8'] else 'BF16'} dispatch, "
             f"channels {c['channels']}, ranks/node {c['ranks_per_node'] or 'all'}",
             f"{'phase':<30}{'time ms':>10}{'GB/s/rank':>11}{'MB sent/rank':>14}{'vs min':>8}",
             "-" * 73]
    for name, secs, nbytes, ratio in rows:
        gbps = nbytes / secs / 1e9 if secs and nbytes else 0.0
        lines.append(f"{name:<30}{secs * 1e3:>10.2f}{gbps:>11.3f}{nbytes / 1e6:>14.2f}"
                     f"{(f'{ratio:.2f}x' if ratio else ''):>8}")
    lines.append(f"dispatch+combine / raw all_to_all: {s['ratio_vs_raw']:.2f}x;  "
                 f"/ naive per-(token,expert): {s['ratio_vs_naive']:.2f}x")
    return "\n".join(lines)


def run_bench(cfg: BenchConfig) -> dict:
    """Run the benchmark on local Gloo ranks (or the torchrun ranks) and summarise it."""
    if "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        init_from_env()
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = _bench_worker(rank, world, cfg)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        return _summarise(cfg, gathered)
    per_rank = run_local(_bench_worker, cfg.world, (cfg,), timeout=3600)
    return _summarise(cfg, per_rank)


def add_args(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    p.add_argument("--world", type=int, default=d.world, help="local ranks to spawn (Gloo)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--experts", type=int, default=d.experts)
    p.add_argument("--topk", type=int, default=d.topk)
    p.add_argument("--iters", type=int, default=d.iters)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--ranks-per-node", type=int, default=None, help="virtual node size")
    p.add_argument("--flat", action="store_true", help="force the flat algorithm across nodes")
    p.add_argument("--channels", type=int, default=d.channels)
    p.add_argument("--fp8", action="store_true", help="dispatch FP8 e4m3 with per-128 scales")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p.add_argument("--mode", choices=("normal", "low-latency"), default="normal",
                   help="normal (default) or low-latency (decode: 128 tokens/rank by default)")


def config_from_args(a: argparse.Namespace) -> BenchConfig:
    return BenchConfig(world=a.world, tokens=a.tokens, hidden=a.hidden, experts=a.experts,
                       topk=a.topk, iters=a.iters, warmup=a.warmup, ranks_per_node=a.ranks_per_node,
                       hierarchical=not a.flat, channels=a.channels, fp8=a.fp8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="flexep bench", description=__doc__.split("\n")[0])
    add_args(p)
    a = p.parse_args(argv)
    if a.mode == "low-latency":
        from .bench_low_latency import run_low_latency_bench
        tokens = a.tokens if "--tokens" in (argv or sys.argv) else 128
        run_low_latency_bench(world_size=a.world, num_tokens=tokens, hidden=a.hidden,
                              num_topk=a.topk, num_experts=a.experts, json_path=a.json)
        return 0
    summary = run_bench(config_from_args(a))
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    print(format_table(summary))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0
