"""``flexep bench``: normal-mode dispatch/combine on DeepSeek-V3-shaped traffic.

Reproduce the README table (4 local Gloo ranks, 1024 tokens per rank)::

    flexep bench --world 4 --tokens 1024 --json bench.json

Every iteration times, on every rank and in the same process group, interleaved so machine
noise hits all of them alike:

* flexep ``get_dispatch_layout``, ``dispatch`` and ``combine``;
* raw ``all_to_all_single`` moving exactly the bytes flexep's dispatch and combine sent
  (buffers prepared in advance: the floor for any algorithm on this transport);
* a naive per-(token, expert) exchange that sends one copy per chosen expert and reduces on
  return, as Megatron's all-to-all token dispatcher does;
* with ``--baselines``: torchtitan's and Megatron-Core's dispatchers where installed, and flexep,
  each driven as its MoE layer drives it (:mod:`flexep.cli.baselines`).

A phase's time is the slowest rank's (the exchange is as slow as its slowest member), the median
over iterations. Correctness is checked before timing. Under ``torchrun`` the same code runs on
the launched ranks instead of spawning local ones.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..comm.accounting import wire_row_bytes
from ..deepep.buffer import Buffer
from .bench_report import format_table
from .common import (
    add_run_args,
    add_shape_args,
    parse_channels,
    run_ranks,
    slowest_median,
    timed,
    under_torchrun,
    write_json,
)
from .netfloor import inter_node_floor, link_rate, node_rows
from .raw import naive_exchange, raw_a2a, raw_buffers

__all__ = ["BenchConfig", "run_bench", "main", "add_args", "run", "format_table"]


@dataclass(frozen=True)
class BenchConfig:
    """Shape of the benchmark traffic and how to run it.

    ``channels`` lists the channel counts to time. Over several nodes (real ones, or virtual ones
    from ``ranks_per_node`` below the world size) every channel count runs both the
    hierarchical and the flat algorithm, in the same iterations; the node shape is detected
    (``ranks_per_node=None``: torchrun's ``LOCAL_WORLD_SIZE``, else host names).
    ``link_gbit``/``paths`` give a node's network for the inter-node floor
    (:mod:`flexep.cli.netfloor`; default: ``NETBED_GBIT``/``NETBED_PATHS`` or the netbed testbed).
    """

    world: int = 4
    tokens: int = 1024
    hidden: int = 7168
    experts: int = 256
    topk: int = 8
    iters: int = 5
    warmup: int = 1
    ranks_per_node: Optional[int] = None
    hierarchical: bool = True
    channels: tuple = (None,)
    fp8: bool = False
    seed: int = 0
    baselines: bool = False
    link_gbit: Optional[float] = None
    paths: Optional[int] = None
    checks: bool = True  # False: Buffers without the agreement round and value checks (as DeepEP)

    def variants(self, multi_node: bool) -> list[tuple[str, bool, Optional[int]]]:
        """``(kind, hierarchical, channels)`` per timed configuration, the first the main one;
        ``channels`` None is the Buffer's default (:mod:`flexep.comm.channels`)."""
        kinds = [("hier", True), ("flat", False)] if multi_node and self.hierarchical else [("flat", False)]
        return [(k, h, c) for k, h in kinds for c in self.channels]


def variant_name(kind: str, requested: Optional[int], channels: int) -> str:
    """``"hier c4"``, or ``"hier c4, default"`` for a Buffer that chose its own count."""
    return f"{kind} c{channels}" + (", default" if requested is None else "")


def _routing(cfg: BenchConfig, rank: int, device: torch.device) -> tuple:
    """``x [T, H] bf16``, ``topk_idx [T, K]`` of random scores, their weights; on ``device``."""
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    scores = torch.rand(cfg.tokens, cfg.experts, generator=gen) + 1e-3
    topk_w, topk_idx = scores.topk(cfg.topk, dim=1)
    x = torch.randn(cfg.tokens, cfg.hidden, generator=gen).to(torch.bfloat16)
    return x.to(device), topk_idx.to(device), topk_w.float().to(device)


def _bench_worker(rank: int, world: int, device: torch.device, cfg: BenchConfig) -> dict:
    group = dist.group.WORLD
    probe = Buffer(group, ranks_per_node=cfg.ranks_per_node, explicitly_destroy=True)
    topology = probe.topology
    probe.destroy()
    checks = {} if cfg.checks else dict(check_consistency=False, validate=False)
    buffers, variants, seen = {}, [], set()
    for kind, hier, c in cfg.variants(topology.is_multi_node):
        buf = Buffer(group, ranks_per_node=topology.ranks_per_node, hierarchical=hier, num_channels=c,
                     explicitly_destroy=True, **checks)
        if (kind, buf.num_channels) in seen:  # the default chose a count also asked for explicitly
            buf.destroy()
            continue
        seen.add((kind, buf.num_channels))
        name = variant_name(kind, c, buf.num_channels)
        buffers[name] = buf
        variants.append((name, hier, buf.num_channels))
    main = next(iter(buffers.values()))
    x, topk_idx, topk_w = _routing(cfg, rank, device)
    x_in = x
    if cfg.fp8:
        from ..quant import per_token_cast_to_fp8
        x_in = per_token_cast_to_fp8(x.float())

    def dispatch(buf, lay):
        return buf.dispatch(x_in, num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1],
                            is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                            topk_idx=topk_idx, topk_weights=topk_w)

    # Correctness first: combine(dispatch(x)) is x times the number of ranks that got it.
    lay = main.get_dispatch_layout(topk_idx, cfg.experts)
    for buf in buffers.values():
        recv = dispatch(buf, lay)
        combined, _, _ = buf.combine(_plain(recv[0]), recv[4])
        expect = _plain(x_in).float() * lay[3].sum(1, keepdim=True)
        if not torch.allclose(combined.float(), expect, rtol=2e-2, atol=2e-2):
            raise RuntimeError(f"bench self-check failed on rank {rank}")

    rows_per_node = node_rows(lay[3], topology.ranks_per_node)
    raw = raw_buffers(cfg, lay[3], rank, world, device)
    suite = None
    if cfg.baselines:
        from .baselines import Suite
        suite = Suite(main, x, topk_idx, topk_w, cfg.experts, group)
    times: dict = {k: [] for k in ["layout", "raw_dispatch", "raw_combine", "floor_dispatch",
                                   "floor_combine", "naive"]}
    traffic: dict = {}
    for name in buffers:
        times[f"{name} dispatch"], times[f"{name} combine"] = [], []
    for it in range(cfg.warmup + cfg.iters):
        keep = it >= cfg.warmup
        lay, t = timed(main.get_dispatch_layout, topk_idx, cfg.experts)
        sample = {"layout": t}
        for name, buf in buffers.items():
            res, sample[f"{name} dispatch"] = timed(dispatch, buf, lay)
            traffic[f"{name} dispatch"] = _stats(buf)
            _, sample[f"{name} combine"] = timed(buf.combine, _plain(res[0]), res[4])
            traffic[f"{name} combine"] = _stats(buf)
            if buf is main:
                handle = res[4]
        _, sample["raw_dispatch"] = timed(raw_a2a, raw, "send", "recv_counts", "send_counts")
        _, sample["raw_combine"] = timed(raw_a2a, raw, "back_src", "send_counts", "recv_counts")
        _, sample["floor_dispatch"] = timed(dist.all_to_all_single, raw["recv"], raw["send"],
                                             raw["recv_counts"], raw["send_counts"])
        _, sample["floor_combine"] = timed(dist.all_to_all_single, raw["back_dst"], raw["back_src"],
                                            raw["send_counts"], raw["recv_counts"])
        (_, naive_bytes), sample["naive"] = timed(naive_exchange, group, x, topk_idx, topk_w, cfg.experts,
                                                   rank, world)
        if suite is not None:  # last: their process-wide settings never overlap flexep's phases
            sample.update(suite.step())
        if keep:
            for k, v in sample.items():
                times.setdefault(k, []).append(v)
        if rank == 0:
            print(f"[flexep bench] iteration {it + 1}/{cfg.warmup + cfg.iters}"
                  f"{' (warm-up)' if not keep else ''}", file=sys.stderr, flush=True)
    del handle
    settings = {name: (buf.comm.check_consistency, buf.comm.validate) for name, buf in buffers.items()}
    for buf in buffers.values():
        buf.destroy()
    return dict(times=times, settings=settings, traffic=traffic, naive_bytes=naive_bytes,
                raw_bytes=raw["bytes"], node_rows=rows_per_node,
                ranks_per_node=topology.ranks_per_node, variants=variants, device=str(device),
                baselines=suite.info if suite is not None else None)


def _plain(x):
    """FP8 tuples dequantised to BF16, what an expert would return to combine."""
    return _dequant(x) if isinstance(x, tuple) else x


def _dequant(x):
    from ..quant import per_token_cast_back
    return per_token_cast_back(*x).to(torch.bfloat16)


def _stats(buf: Buffer) -> dict:
    t = buf.last_traffic
    return dict(sent=dict(t.sent), payload=dict(t.payload), minimum=dict(t.minimum))


def _summarise(cfg: BenchConfig, per_rank: list) -> dict:
    """Slowest rank per iteration, median over iterations; bytes summed over ranks."""
    world = len(per_rank)
    t = slowest_median([r["times"] for r in per_rank], 0)
    cpu = slowest_median([r["times"] for r in per_rank], 1)

    def total(key, field, link):
        return sum(r["traffic"][key][field][link] for r in per_rank)

    variants = []
    for name, hier, channels in per_rank[0]["variants"]:
        consistency, validate = per_rank[0]["settings"][name]  # what the Buffers were built with
        row = dict(name=name, hierarchical=hier, channels=channels, check_consistency=consistency,
                   validate=validate, dispatch_s=t[f"{name} dispatch"], combine_s=t[f"{name} combine"])
        for op in ("dispatch", "combine"):
            for link in ("local", "intra", "inter"):
                row[f"{op}_{link}_bytes"] = total(f"{name} {op}", "payload", link)
                row[f"{op}_{link}_min"] = total(f"{name} {op}", "minimum", link)
        variants.append(row)
    main = variants[0]
    ours = main["dispatch_s"] + main["combine_s"]
    raw = t["raw_dispatch"] + t["raw_combine"]
    config = dict(asdict(cfg), world=world, ranks_per_node=per_rank[0]["ranks_per_node"],
                  device=per_rank[0]["device"])
    out = dict(config=config, times_s=t, cpu_s=cpu, variants=variants, world=world,
               raw_bytes_per_rank=max(r["raw_bytes"] for r in per_rank),
               naive_bytes_per_rank=max(r["naive_bytes"] for r in per_rank),
               ratio_vs_raw=ours / raw, ratio_vs_naive=ours / t["naive"],
               ratio_vs_floor=ours / (t["floor_dispatch"] + t["floor_combine"]),
               cpu_ratio_vs_raw=(cpu[f"{main['name']} dispatch"] + cpu[f"{main['name']} combine"])
               / (cpu["raw_dispatch"] + cpu["raw_combine"]))
    rpn = per_rank[0]["ranks_per_node"]
    if world > rpn:
        out["inter_node_floor"] = _floor(cfg, [r["node_rows"] for r in per_rank], rpn, variants, raw)
    if per_rank[0]["baselines"] is not None:
        from .baselines.report import summarise
        out["baselines"] = summarise(per_rank[0]["baselines"], t, cpu, t["layout"] + ours)
    return out


def _floor(cfg: BenchConfig, rows: list, rpn: int, variants: list, raw: float) -> dict:
    """The inter-node floor of the run's routing and every variant's time over it."""
    rate = link_rate(cfg.link_gbit, cfg.paths)
    combine_row = wire_row_bytes(cfg.hidden, torch.bfloat16)  # token data only (netfloor's rule)
    dispatch_row = combine_row
    if cfg.fp8:
        scales = (cfg.hidden // 128, torch.float32)
        dispatch_row = wire_row_bytes(cfg.hidden, torch.float8_e4m3fn, scales=scales)
    f = inter_node_floor(rows, rpn, dispatch_row, combine_row, rate)
    out = dict(asdict(f), rows_out=list(f.rows_out), rows_in=list(f.rows_in), total_s=f.total_s,
               gbit=rate.gbit if rate else None, paths=rate.paths if rate else None,
               rate_source=rate.source if rate else None, vs_floor={})
    if f.total_s:
        for v in variants:
            out["vs_floor"][v["name"]] = (v["dispatch_s"] + v["combine_s"]) / f.total_s
        out["vs_floor"]["raw flat a2a"] = raw / f.total_s
    return out


def run_bench(cfg: BenchConfig) -> dict:
    """Run the benchmark on local Gloo ranks (or the torchrun ranks) and summarise it."""
    return _summarise(cfg, run_ranks(_bench_worker, cfg.world, (cfg,)))


def add_args(p: argparse.ArgumentParser) -> None:
    """``flexep bench`` options (shared by every mode)."""
    d = BenchConfig()
    p.add_argument("--mode", choices=("normal", "low-latency"), default="normal",
                   help="normal (default) or low-latency (decode: 1, 8 and 128 tokens/rank by default, "
                   "each next to one raw all_to_all each way)")
    p.add_argument("--api", choices=("v1", "v2"), default="v1",
                   help="v2: DeepEP V2's EPBuffer (counted, expanded, sync-free) beside V1's Buffer")
    add_shape_args(p, tokens=None, tokens_help=f"tokens per rank (default {d.tokens}; low-latency: 1, 8 "
                   "and 128 in one run)")
    add_run_args(p, iters=d.iters)
    g = p.add_argument_group("topology and channels")
    g.add_argument("--ranks-per-node", type=int, default=None,
                   help="node size (default: detected; smaller than the world makes virtual nodes)")
    g.add_argument("--flat", action="store_true", help="force the flat algorithm across nodes")
    g.add_argument("--channels", default="default", type=parse_channels,
                   help="channel counts to time, e.g. 1,2,4; 'default' is the Buffer's own choice "
                        "(1 on one machine, more across machines on Gloo; docs/normal-mode.md)")
    g.add_argument("--link-gbit", type=float, default=None,
                   help="each inter-node path's rate in Gbit/s, for the inter-node floor (default: "
                        "NETBED_GBIT, else the netbed testbed the run is in)")
    g.add_argument("--paths", type=int, default=None,
                   help="parallel inter-node paths per node (default: NETBED_PATHS, else netbed's, else 1)")
    p.add_argument("--no-checks", action="store_true",
                   help="time Buffers built with check_consistency=False and validate=False (no "
                        "agreement round in combine, no value checks; docs/profile.md)")
    p.add_argument("--plot", metavar="PNG", help="write a plot of bytes and time per variant")
    p.add_argument("--baselines", action="store_true",
                   help="also time torchtitan's and Megatron-Core's dispatchers where installed, and "
                        "flexep, each as its MoE layer drives it (docs/benchmarks.md)")


def config_from_args(a: argparse.Namespace) -> BenchConfig:
    a.tokens = a.tokens or BenchConfig.tokens
    if a.quick:
        a.tokens, a.hidden, a.iters, a.warmup = min(a.tokens, 256), min(a.hidden, 2048), 2, 1
    return BenchConfig(world=a.world, tokens=a.tokens, hidden=a.hidden, experts=a.experts,
                       topk=a.topk, iters=a.iters, warmup=a.warmup, ranks_per_node=a.ranks_per_node,
                       hierarchical=not a.flat, fp8=a.fp8, seed=a.seed, baselines=a.baselines,
                       channels=a.channels,
                       link_gbit=a.link_gbit, paths=a.paths, checks=not a.no_checks)


def run(a: argparse.Namespace) -> int:
    """Run ``flexep bench`` with parsed options; print on one rank; 0 on success."""
    if a.no_checks and (a.mode == "low-latency" or a.api == "v2"):
        print("flexep bench: --no-checks applies to the V1 normal-mode bench (low latency checks in "
              "band, without a round)", file=sys.stderr)
        return 2
    if a.baselines and (a.mode == "low-latency" or a.api == "v2"):
        print("flexep bench: --baselines runs with the V1 normal-mode bench (no --mode low-latency, "
              "no --api v2)", file=sys.stderr)
        return 2
    if a.mode == "low-latency":
        from .bench_ll import run as run_low_latency
        return run_low_latency(a)
    if a.api == "v2":
        from .bench_v2 import run as run_v2
        return run_v2(a)
    summary = run_bench(config_from_args(a))
    if under_torchrun():  # the launched ranks leave the group they joined; rank 0 reports
        reporter = dist.get_rank() == 0
        dist.destroy_process_group()
        if not reporter:
            return 0
    print(format_table(summary))
    if a.json:
        write_json(a.json, summary)
    if a.plot:
        from .plots import plot

        plot(summary, a.plot)
        print(f"plot written to {a.plot}")
    return 0


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="flexep bench", description=__doc__.split("\n")[0])
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
