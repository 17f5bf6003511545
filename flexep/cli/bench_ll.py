"""Low-latency benchmark: LL dispatch + combine next to one raw exchange each way, per batch size.

Reproduce (4 local Gloo ranks, DeepSeek-V3 shape: hidden 7168, top-8 of 256 experts, FP8
dispatch, BF16 weighted combine, capacity = tokens per rank)::

    flexep bench --mode low-latency --fp8 --iters 20
    python -m flexep.cli.bench_ll --fp8 --iters 20 --profile --json bench_ll.json

For every batch size (1, 8 and 128 tokens per rank by default), in one run:

* **LL**: ``low_latency_dispatch`` then ``low_latency_combine`` of a fixed expert output, on a
  default ``Buffer`` (checks on), timed as one unit and as its two halves;
* **raw**: ``all_to_all_single`` of the routing's minimal bytes once each way -- one row of data
  (+ FP8 scales) per (token, destination rank) out, one BF16 row back -- with the counts known in
  advance (as in low-latency mode) and send/receive buffers allocated once;
* optionally normal mode (layout + dispatch + combine) on the same tokens.

Correctness is checked first, on every rank: LL dispatch receives exactly the (token, expert)
entries the routing sends here, and LL combine of identity experts gives
``x * sum of the token's valid weights`` (DeepEP's test). Phases are interleaved in every
iteration and start together (a barrier before each), so machine noise hits all of them alike.
A phase's time is the slowest rank's, the median over iterations. Bytes are what a rank hands
the backend for its peers (max over ranks), LL's next to the raw exchange's (the routing's
minimum). ``--profile`` adds where LL's time goes on rank 0 (cProfile, by function).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..buffer import Buffer
from ..launch import run_local
from ..quant import per_token_cast_to_fp8
from ..utils import calc_diff
from .common import parse_channels

__all__ = ["run_low_latency_bench", "format_table", "main", "run", "PROFILE_PHASES"]

# Profile phases: name -> the functions whose cumulative time it is (pstats keys end with these).
PROFILE_PHASES = (
    ("wait for data", ("<method 'wait' of 'torch._C._distributed_c10d.Work' objects>",
                       "<built-in method torch._C._distributed_c10d.wait>")),
    ("post exchanges", ("<built-in method torch._C._distributed_c10d.all_to_all_single>",)),
    ("FP8 cast + pack rows", ("ll_wire.py:pack_dispatch",)),
    ("expand into slots", ("ll_wire.py:expand_dispatch",)),
    ("owner weighted sum", ("ll_reduce.py:reduce_owner",)),
    ("source sum", ("ll_reduce.py:sum_partials",)),
    ("LogFMT encode/decode", ("logfmt.py:encode", "logfmt.py:decode")),
    ("checks (local + in-band verdict)", ("communicator.py:_build", "ll_agreement.py:verdict",
                                          "control.py:round")),
)


def _inputs(rank: int, num_tokens: int, hidden: int, num_topk: int, num_experts: int):
    """DeepEP-style decode inputs: ``x [T, H] bf16``, top-k of random scores, |randn| weights,
    DeepEP's 10 unused slots per 128 tokens."""
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    scores = torch.randn(num_tokens, num_experts, generator=gen).abs() + 1
    topk_idx = scores.topk(num_topk, dim=1).indices
    flat = topk_idx.view(-1)
    # DeepEP masks 10 random slots of 128 tokens; scaled to the batch (none below 13 tokens)
    flat[torch.randperm(flat.numel(), generator=gen)[:10 * num_tokens // 128]] = -1
    weights = torch.randn(num_tokens, num_topk, generator=gen).abs()
    return x, topk_idx, weights


def _timed(fn: Callable, *args, cpu: Optional[list] = None, **kwargs) -> float:
    """Wall seconds of ``fn(*args)``, all ranks starting together; this process's CPU seconds
    (its threads included: Gloo's send and receive work) are appended to ``cpu``."""
    dist.barrier()
    start, start_cpu = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    if cpu is not None:
        cpu.append(time.process_time() - start_cpu)
    return time.perf_counter() - start


def _peer_bytes(buf: Buffer) -> int:
    stats = buf.last_traffic
    return stats.sent["intra"] + stats.sent["inter"]


def _check(rank: int, world: int, buf: Buffer, x, topk_idx, weights, num_experts: int) -> torch.Tensor:
    """Raise unless LL dispatch/combine are right here; returns the expert outputs ``y`` (BF16
    identity experts in the dispatch's slot layout) the timed combines use."""
    capacity = x.size(0)
    recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(x, topk_idx, capacity, num_experts,
                                                                use_fp8=False)
    parts = [torch.empty_like(topk_idx) for _ in range(world)]
    dist.all_gather(parts, topk_idx.contiguous())
    gathered = torch.cat([p.view(-1) for p in parts])
    local = num_experts // world
    ids = gathered - rank * local
    expected = torch.zeros(local + 1, dtype=torch.int64)
    expected.index_add_(0, torch.where((ids >= 0) & (ids < local), ids, local), torch.ones_like(ids))
    if not torch.equal(recv_count.long(), expected[:local]):
        raise RuntimeError(f"LL bench self-check: rank {rank} recv_count {recv_count.tolist()} != "
                           f"{expected[:local].tolist()}")
    y = recv_x.clone()
    combined, _, _ = buf.low_latency_combine(y, topk_idx, weights, handle)
    want = x.float() * weights.masked_fill(topk_idx < 0, 0).sum(1, keepdim=True)
    diff = calc_diff(combined.float(), want)
    if diff > 1e-5:
        raise RuntimeError(f"LL bench self-check: rank {rank} combine calc_diff {diff:.2e} > 1e-5")
    return y


class _Raw:
    """``all_to_all_single`` of the routing's minimal rows each way, counts known in advance."""

    def __init__(self, rank: int, world: int, topk_idx: torch.Tensor, num_experts: int, out_row: int,
                 back_row: int) -> None:
        local = num_experts // world
        owner = torch.where(topk_idx >= 0, topk_idx // local, world)
        hit = torch.zeros(topk_idx.size(0), world + 1, dtype=torch.bool)
        hit.scatter_(1, owner, True)
        send = hit[:, :world].sum(0)
        parts = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(parts, send)
        table = torch.cat(parts)
        self.sc, self.rc = send.tolist(), table.view(world, world)[:, rank].tolist()
        self.send = torch.randint(0, 255, (sum(self.sc), out_row), dtype=torch.uint8)
        self.recv = torch.empty(sum(self.rc), out_row, dtype=torch.uint8)
        self.back_src = torch.randint(0, 255, (sum(self.rc), back_row), dtype=torch.uint8)
        self.back = torch.empty(sum(self.sc), back_row, dtype=torch.uint8)
        peers = [r for r in range(world) if r != rank]
        self.bytes_out = sum(self.sc[r] for r in peers) * out_row
        self.bytes_back = sum(self.rc[r] for r in peers) * back_row

    def dispatch(self) -> None:
        dist.all_to_all_single(self.recv, self.send, self.rc, self.sc)

    def combine(self) -> None:
        dist.all_to_all_single(self.back, self.back_src, self.sc, self.rc)

    def both(self) -> None:
        self.dispatch()
        self.combine()


def _profile(call: Callable, reps: int) -> dict:
    """Seconds per call by :data:`PROFILE_PHASES` (cumulative), plus ``total`` and ``other``."""
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(reps):
        call()
    prof.disable()
    total = (time.perf_counter() - start) / reps
    stats = pstats.Stats(prof).stats
    out = {}
    for name, keys in PROFILE_PHASES:
        secs = 0.0
        for (path, _, fn), (_, _, tottime, cumtime, _) in stats.items():
            label = f"{path.rsplit('/', 1)[-1]}:{fn}" if path != "~" else fn
            if label in keys:
                secs += tottime if path == "~" else cumtime
        out[name] = secs / reps
    out["total"] = total
    out["other Python (faces, pool, accounting)"] = max(0.0, total - sum(out[n] for n, _ in PROFILE_PHASES))
    return out


def _one_size(rank: int, world: int, tokens: int, cfg: dict) -> dict:
    hidden, num_topk, num_experts = cfg["hidden"], cfg["num_topk"], cfg["num_experts"]
    use_fp8 = cfg["fp8"]
    x, topk_idx, weights = _inputs(rank, tokens, hidden, num_topk, num_experts)
    size = Buffer.get_low_latency_rdma_size_hint(tokens, hidden, world, num_experts)
    bufs = {c: Buffer(dist.group.WORLD, 0, size, low_latency_mode=True,
                      num_channels=None if c == "default" else c,
                      ranks_per_node=cfg["ranks_per_node"]) for c in cfg["channels"]}
    first = bufs[cfg["channels"][0]]
    y = _check(rank, world, first, x, topk_idx, weights, num_experts)
    out_row = hidden + 4 * (hidden // 128) if use_fp8 else 2 * hidden
    raw = _Raw(rank, world, topk_idx, num_experts, out_row, 2 * hidden)

    handles: dict = {}

    def dispatch(buf: Buffer) -> None:
        handles[buf] = buf.low_latency_dispatch(x, topk_idx, tokens, num_experts, use_fp8=use_fp8)[2]

    def combine(buf: Buffer) -> None:
        buf.low_latency_combine(y, topk_idx, weights, handles.pop(buf))

    def both(buf: Buffer) -> None:
        dispatch(buf)
        combine(buf)

    times: dict = {}
    sent: dict = {}
    cpu: dict = {}
    for it in range(cfg["warmup"] + cfg["iters"]):
        keep = it >= cfg["warmup"]
        t = {"raw": _timed(raw.both, cpu=cpu.setdefault("raw", []) if keep else None),
             "raw_dispatch": _timed(raw.dispatch), "raw_combine": _timed(raw.combine)}
        for c, buf in bufs.items():
            t[f"ll_c{c}"] = _timed(both, buf, cpu=cpu.setdefault(f"ll_c{c}", []) if keep else None)
            t[f"ll_dispatch_c{c}"] = _timed(dispatch, buf)
            sent[f"ll_dispatch_c{c}"] = _peer_bytes(buf)
            t[f"ll_combine_c{c}"] = _timed(combine, buf)
            sent[f"ll_combine_c{c}"] = _peer_bytes(buf)
        if cfg["normal"]:
            t["normal"] = _timed(_normal_round, first, x, topk_idx, weights, num_experts, use_fp8)
        if keep:
            for k, v in t.items():
                times.setdefault(k, []).append(v)
    out = dict(times=times, sent=sent, raw_bytes=raw.bytes_out + raw.bytes_back,
               cpu={k: statistics.median(v) for k, v in cpu.items()},
               channels={str(c): buf.num_channels for c, buf in bufs.items()})
    if cfg["profile"]:  # every rank makes the calls; rank 0 reports
        profile = _profile(lambda: both(first), max(3, cfg["iters"] // 2))
        if rank == 0:
            out["profile"] = profile
    return out


def _normal_round(buf: Buffer, x, topk_idx, weights, num_experts: int, use_fp8: bool) -> None:
    """Normal mode on the same tokens: layout, dispatch, local weighted sum, combine."""
    lay = buf.get_dispatch_layout(topk_idx, num_experts)
    x_in = per_token_cast_to_fp8(x) if use_fp8 else x
    recv = buf.dispatch(x_in, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3],
                        num_tokens_per_expert=lay[2], topk_idx=topk_idx, topk_weights=weights)
    rows = recv[0][0].float().to(torch.bfloat16) if use_fp8 else recv[0]
    buf.combine(rows, recv[4])


def _worker(rank: int, world: int, cfg: dict) -> dict:
    out = {}
    for tokens in cfg["tokens"]:
        out[tokens] = _one_size(rank, world, tokens, cfg)
        if rank == 0:
            print(f"[flexep bench low-latency] {tokens} tokens/rank done", file=sys.stderr, flush=True)
    return out


def _summarise(per_rank: list, config: dict) -> dict:
    """Slowest rank per iteration, median over iterations (ms); bytes: max over ranks."""
    results = {}
    for tokens in config["tokens"]:
        runs = [r[tokens] for r in per_rank]

        def ms(name, runs=runs):
            return statistics.median(max(v) for v in zip(*[r["times"][name] for r in runs])) * 1e3

        def cpu_ms(name, runs=runs):
            return statistics.mean(r["cpu"][name] for r in runs) * 1e3

        row = {"raw_ms": ms("raw"), "raw_dispatch_ms": ms("raw_dispatch"),
               "raw_combine_ms": ms("raw_combine"), "raw_cpu_ms": cpu_ms("raw"),
               "raw_bytes": max(r["raw_bytes"] for r in runs)}
        for c in config["channels"]:
            ll_bytes = max(r["sent"][f"ll_dispatch_c{c}"] + r["sent"][f"ll_combine_c{c}"] for r in runs)
            row[f"c{c}"] = {"channels": runs[0]["channels"][str(c)],
                            "ll_ms": ms(f"ll_c{c}"), "dispatch_ms": ms(f"ll_dispatch_c{c}"),
                            "combine_ms": ms(f"ll_combine_c{c}"), "ratio": ms(f"ll_c{c}") / row["raw_ms"],
                            "ll_cpu_ms": cpu_ms(f"ll_c{c}"), "ll_bytes": ll_bytes,
                            "bytes_ratio": ll_bytes / max(1, row["raw_bytes"])}
        if config["normal"]:
            row["normal_ms"] = ms("normal")
        if "profile" in runs[0]:
            row["profile_ms"] = {k: v * 1e3 for k, v in runs[0]["profile"].items()}
        results[str(tokens)] = row
    return dict(config=config, results=results)


def format_table(summary: dict) -> str:
    """The readable table printed by :func:`run_low_latency_bench`."""
    c = summary["config"]
    mode = "FP8" if c["fp8"] else "BF16"
    normal = f" {'normal ms':>10}" if c["normal"] else ""
    lines = [f"flexep low-latency bench: world {c['world_size']} (Gloo), hidden {c['hidden']}, "
             f"top-{c['num_topk']} of {c['num_experts']} experts, {mode} dispatch + BF16 weighted combine, "
             f"capacity = tokens/rank, median of {c['iters']} iterations (slowest rank)",
             f"{'tokens/rank':>11} {'ch':>3} {'LL disp+comb ms':>16} {'raw both ways ms':>17} {'ratio':>7} "
             f"{'LL dispatch':>12} {'LL combine':>11} {'bytes LL/min':>13} {'CPU ms LL / raw':>16}" + normal,
             "-" * (113 + len(normal))]
    for tokens, row in summary["results"].items():
        for ch in c["channels"]:
            v = row[f"c{ch}"]
            label = f"{v['channels']}*" if ch == "default" else str(ch)
            line = (f"{tokens:>11} {label:>3} {v['ll_ms']:>16.2f} {row['raw_ms']:>17.2f} {v['ratio']:>6.2f}x "
                    f"{v['dispatch_ms']:>12.2f} {v['combine_ms']:>11.2f} {v['bytes_ratio']:>13.2f} "
                    f"{v['ll_cpu_ms']:>8.2f} / {row['raw_cpu_ms']:<5.2f}")
            if c["normal"]:
                line += f" {row['normal_ms']:>10.2f}"
            lines.append(line)
    if any("profile_ms" in row for row in summary["results"].values()):
        lines += ["", "where LL dispatch+combine spends its time on rank 0 (ms per call, under cProfile):"]
        names = [n for n, _ in PROFILE_PHASES] + ["other Python (faces, pool, accounting)", "total"]
        head = f"{'':<42}" + "".join(f"{t + ' tok':>11}" for t in summary["results"])
        lines.append(head)
        for name in names:
            lines.append(f"{name:<42}" + "".join(f"{row['profile_ms'][name]:>11.2f}"
                                                 for row in summary["results"].values()))
    if "default" in c["channels"]:
        lines.append("ch: channels; * the Buffer's default (num_channels=None)")
    lines.append("ratio = LL dispatch+combine / raw all_to_all_single of the minimal bytes each way; bytes "
                 "LL/min: what LL hands the backend for its peers (rows padded to capacity, weights, "
                 "headers) over the raw exchange's; CPU ms: one rank's process CPU time per call (its "
                 "Gloo threads included), mean over ranks.")
    return "\n".join(lines)


def run_low_latency_bench(world_size: int = 4, tokens: Sequence[int] = (1, 8, 128), hidden: int = 7168,
                          num_topk: int = 8, num_experts: int = 256, iters: int = 10, warmup: int = 2,
                          fp8: bool = True, channels: Sequence = (1,),
                          ranks_per_node: Optional[int] = None, normal: bool = False, profile: bool = False,
                          json_path: Optional[str] = None) -> dict:
    """Spawn ``world_size`` Gloo ranks, check correctness, time LL against the raw exchange at
    every batch size in ``tokens``, print a table.

    Returns the summary: ``config`` and per batch size ``results[str(tokens)]`` with ``raw_ms``,
    and per channel count ``c<C>`` (``"default"``: the Buffer's own choice) the LL times,
    ``ratio`` to the raw exchange and ``bytes_ratio`` (also written to ``json_path`` when given).
    """
    config = dict(world_size=world_size, tokens=list(tokens), hidden=hidden, num_topk=num_topk,
                  num_experts=num_experts, iters=iters, warmup=warmup, fp8=bool(fp8), channels=list(channels),
                  ranks_per_node=ranks_per_node, normal=bool(normal), profile=bool(profile))
    per_rank = run_local(_worker, world_size, (config,), timeout=3600)
    summary = _summarise(per_rank, config)
    print(format_table(summary), flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _labels(channels: Sequence[Optional[int]]) -> list:
    """Channel counts from :func:`~flexep.cli.common.parse_channels`, the Buffer's default
    (None) named ``"default"`` (it keys the results: ``c1``, ``cdefault``)."""
    return ["default" if c is None else c for c in channels]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", type=int, default=4, help="local ranks to spawn (Gloo)")
    p.add_argument("--tokens", default="1,8,128", help="tokens per rank (= capacity), comma separated")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--channels", default="1", type=parse_channels,
                   help="channel counts to time, e.g. 1,2; 'default' is the Buffer's own choice")
    p.add_argument("--fp8", action="store_true", help="dispatch FP8 e4m3 (DeepEP's default); else BF16")
    p.add_argument("--ranks-per-node", type=int, default=None, help="virtual node size (accounting only)")
    p.add_argument("--normal", action="store_true", help="also time normal mode on the same tokens")
    p.add_argument("--profile", action="store_true", help="where LL's time goes (rank 0, cProfile)")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flexep.cli.bench_ll", description=__doc__.split("\n")[0])
    add_args(p)
    a = p.parse_args(argv)
    run_low_latency_bench(a.world, [int(t) for t in a.tokens.split(",")], a.hidden, a.topk, a.experts,
                          a.iters, a.warmup, a.fp8, _labels(a.channels),
                          a.ranks_per_node, a.normal, a.profile, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run(a) -> int:
    """``flexep bench --mode low-latency`` with the options ``flexep bench`` parsed: every shape,
    iteration, FP8, channel and node option applies; decode batches of 1, 8 and 128 tokens per
    rank unless ``--tokens`` names one."""
    tokens = [a.tokens] if a.tokens else [1, 8, 128]
    iters, warmup, hidden = a.iters, a.warmup, a.hidden
    if a.quick:
        tokens, hidden, iters, warmup = [min(t, 16) for t in tokens][:2], min(hidden, 1024), 2, 1
    run_low_latency_bench(world_size=a.world, tokens=tokens, hidden=hidden, num_topk=a.topk,
                          num_experts=a.experts, iters=iters, warmup=warmup, fp8=True,
                          channels=_labels(a.channels),
                          ranks_per_node=a.ranks_per_node, json_path=a.json)
    return 0
