"""``flexep bench --api v2``: DeepEP V2's ``EPBuffer`` next to V1's ``Buffer`` in the same run.

Reproduce the docs table (4 local Gloo ranks, 512 tokens per rank)::

    flexep bench --api v2 --world 4 --tokens 512 --json bench_v2.json

Every iteration times, interleaved on the same ranks (so machine noise hits all alike):

* **v1**: ``get_dispatch_layout`` + ``dispatch``, then ``combine`` (V1's ``Buffer``);
* **v2 counted** / **v2 counted expanded**: ``EPBuffer.dispatch`` with CPU sync (exact sizes;
  non-expanded and ``do_expand=True``), then ``combine``;
* **v2 sync-free** / **v2 sync-free expanded**: ``do_cpu_sync=False`` (no host read; outputs of
  ``W * T`` rows, or the expanded worst case), then ``combine``.

For each: time (slowest rank, median), bytes each rank handed to the transport, the routing's
minimum for that wire format, the extra bytes over the counted V2 path (what not knowing the
counts on the host costs), and output rows allocated against rows holding tokens. Correctness is
checked before timing: ``combine(dispatch(x))`` must be ``x`` times the token's fan-out.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..deepep.buffer import Buffer
from ..deepep.elastic import EPBuffer
from ..quant import per_token_cast_back, per_token_cast_to_fp8
from .common import run_ranks, slowest_median, timed, under_torchrun, write_json

__all__ = ["V2BenchConfig", "run_v2_bench", "format_v2_table", "run"]

VARIANTS = ("v1", "v2 counted", "v2 counted expanded", "v2 sync-free", "v2 sync-free expanded")
LINKS = ("local", "intra", "inter")


@dataclass(frozen=True)
class V2BenchConfig:
    world: int = 4
    tokens: int = 512
    hidden: int = 7168
    experts: int = 256
    topk: int = 8
    iters: int = 5
    warmup: int = 1
    ranks_per_node: Optional[int] = None
    fp8: bool = False
    seed: int = 0


def _inputs(cfg: V2BenchConfig, rank: int, device: torch.device):
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    scores = torch.rand(cfg.tokens, cfg.experts, generator=gen) + 1e-3
    w, idx = scores.topk(cfg.topk, dim=1)
    x = torch.randn(cfg.tokens, cfg.hidden, generator=gen).to(torch.bfloat16)
    x_in = per_token_cast_to_fp8(x.float()) if cfg.fp8 else x
    to = (lambda t: tuple(p.to(device) for p in t)) if cfg.fp8 else (lambda t: t.to(device))
    return x.to(device), to(x_in), idx.to(device), w.float().to(device)


def _bf16(x):
    return per_token_cast_back(*x).to(torch.bfloat16) if isinstance(x, tuple) else x


def _traffic(buf) -> dict:
    t = buf.last_traffic
    return dict(payload=sum(t.payload[k] for k in LINKS), minimum=sum(t.minimum[k] for k in LINKS))


def _worker(rank: int, world: int, device: torch.device, cfg: V2BenchConfig) -> dict:
    group = dist.group.WORLD
    v1 = Buffer(group, ranks_per_node=cfg.ranks_per_node, explicitly_destroy=True)
    v2 = EPBuffer(group, num_max_tokens_per_rank=cfg.tokens, hidden=cfg.hidden, num_topk=cfg.topk,
                  use_fp8_dispatch=cfg.fp8, ranks_per_node=cfg.ranks_per_node, num_experts=cfg.experts,
                  explicitly_destroy=True)
    x, x_in, idx, w = _inputs(cfg, rank, device)
    fanout = torch.zeros(cfg.tokens, world, dtype=torch.bool, device=device)
    fanout.scatter_(1, idx // (cfg.experts // world), True)

    def v1_dispatch():
        lay = v1.get_dispatch_layout(idx, cfg.experts)
        return v1.dispatch(x_in, num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1],
                           is_token_in_rank=lay[3], num_tokens_per_expert=lay[2], topk_idx=idx,
                           topk_weights=w)

    def v2_dispatch(sync: bool, expand: bool):
        return lambda: v2.dispatch(x_in, topk_idx=idx, topk_weights=w, num_experts=cfg.experts,
                                   do_cpu_sync=sync, do_expand=expand)

    def v2_combine(out):
        return v2.combine(_bf16(out[0]), out[3])

    plans = {"v1": (v1, v1_dispatch, lambda out: v1.combine(_bf16(out[0]), out[4])),
             "v2 counted": (v2, v2_dispatch(True, False), v2_combine),
             "v2 counted expanded": (v2, v2_dispatch(True, True), v2_combine),
             "v2 sync-free": (v2, v2_dispatch(False, False), v2_combine),
             "v2 sync-free expanded": (v2, v2_dispatch(False, True), v2_combine)}
    slots = (idx >= 0).sum(1, keepdim=True).float()
    rows: dict = {}
    for name, (_, dispatch, combine) in plans.items():  # correctness first
        out = dispatch()
        got = combine(out)[0].float()
        times = slots if "expanded" in name else fanout.sum(1, keepdim=True).float()
        if not torch.allclose(got, _bf16(x_in).float() * times, rtol=2e-2, atol=2e-2):
            raise RuntimeError(f"bench self-check failed on rank {rank} for {name}")
        recv = out[0][0] if isinstance(out[0], tuple) else out[0]
        used = out[4].num_recv_tokens if name == "v1" else None
        if used is None:
            h = out[3]
            used = int(h.psum_num_recv_tokens_per_expert[-1]) if "expanded" in name else \
                int(h.psum_num_recv_tokens_per_scaleup_rank[-1])
        rows[name] = (recv.size(0), used)
    samples = {f"{n} {op}": [] for n in VARIANTS for op in ("dispatch", "combine")}
    traffic: dict = {}
    for it in range(cfg.warmup + cfg.iters):
        for name, (buf, dispatch, combine) in plans.items():
            out, t_dispatch = timed(dispatch)
            traffic[f"{name} dispatch"] = _traffic(buf)
            _, t_combine = timed(combine, out)
            traffic[f"{name} combine"] = _traffic(buf)
            if it >= cfg.warmup:
                samples[f"{name} dispatch"].append(t_dispatch)
                samples[f"{name} combine"].append(t_combine)
    v1.destroy()
    v2.destroy()
    return dict(samples=samples, traffic=traffic, rows=rows)


def _summarise(cfg: V2BenchConfig, per_rank: list) -> dict:
    t = slowest_median([r["samples"] for r in per_rank])
    world = len(per_rank)
    out = []
    for name in VARIANTS:
        row = dict(name=name)
        for op in ("dispatch", "combine"):
            row[f"{op}_s"] = t[f"{name} {op}"]
            for field in ("payload", "minimum"):
                row[f"{op}_{field}"] = sum(r["traffic"][f"{name} {op}"][field] for r in per_rank) // world
        row["rows_out"] = sum(r["rows"][name][0] for r in per_rank) // world
        row["rows_used"] = sum(r["rows"][name][1] for r in per_rank) // world
        out.append(row)
    counted = {v["name"]: v for v in out}
    for v in out:  # what the worst-case sizes cost over the counted V2 path of the same layout
        base = counted["v2 counted expanded" if "expanded" in v["name"] else "v2 counted"]
        v["extra_bytes"] = sum(v[f"{op}_payload"] - base[f"{op}_payload"] for op in ("dispatch", "combine"))
    return dict(config=asdict(cfg), variants=out, world=world)


def run_v2_bench(cfg: V2BenchConfig) -> dict:
    """Run on local Gloo ranks (or the torchrun ranks) and summarise."""
    return _summarise(cfg, run_ranks(_worker, cfg.world, (cfg,)))


def format_v2_table(s: dict) -> str:
    c = s["config"]
    lines = [f"flexep bench --api v2: world {s['world']}, {c['tokens']} tokens/rank, hidden {c['hidden']}, "
             f"top-{c['topk']} of {c['experts']} experts, {'FP8' if c['fp8'] else 'BF16'} dispatch, "
             f"BF16 combine, ranks/node {c['ranks_per_node'] or s['world']}",
             "(MB/rank: bytes each rank handed to the transport, dispatch + combine; 'vs min': over the "
             "routing's minimum for that wire format; 'extra': over the counted V2 path of the same layout; "
             "rows: output rows allocated / holding tokens)",
             f"{'variant':<24}{'dispatch ms':>12}{'combine ms':>11}{'MB/rank':>9}{'vs min':>8}"
             f"{'extra MB':>10}{'rows':>14}", "-" * 88]
    for v in s["variants"]:
        sent = v["dispatch_payload"] + v["combine_payload"]
        low = v["dispatch_minimum"] + v["combine_minimum"]
        ratio = f"{sent / low:.2f}x" if low else "-"
        lines.append(f"{v['name']:<24}{v['dispatch_s'] * 1e3:>12.2f}{v['combine_s'] * 1e3:>11.2f}"
                     f"{sent / 1e6:>9.2f}{ratio:>8}{v['extra_bytes'] / 1e6:>10.2f}"
                     f"{str(v['rows_out']) + '/' + str(v['rows_used']):>14}")
    return "\n".join(lines)


def config_from_args(a: argparse.Namespace) -> V2BenchConfig:
    tokens = a.tokens or V2BenchConfig.tokens
    if a.quick:
        tokens, a.hidden, a.iters, a.warmup = min(tokens, 128), min(a.hidden, 2048), 2, 1
    return V2BenchConfig(world=a.world, tokens=tokens, hidden=a.hidden, experts=a.experts, topk=a.topk,
                         iters=a.iters, warmup=a.warmup, ranks_per_node=a.ranks_per_node, fp8=a.fp8,
                         seed=a.seed)


def run(a: argparse.Namespace) -> int:
    """``flexep bench --api v2`` with parsed options (``flexep bench``'s)."""
    summary = run_v2_bench(config_from_args(a))
    if under_torchrun():
        reporter = dist.get_rank() == 0
        dist.destroy_process_group()
        if not reporter:
            return 0
    print(format_v2_table(summary))
    if a.json:
        write_json(a.json, summary)
    return 0
