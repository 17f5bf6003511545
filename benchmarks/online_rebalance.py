"""Online EPLB on a shifting workload: the busiest rank's load over the mean, window by window.

Reproduce:  python benchmarks/online_rebalance.py            (table, then a summary)
            python benchmarks/online_rebalance.py --json     (JSON lines)

Four Gloo ranks on this machine (two virtual nodes of two). One MoE layer routed like Qwen3-MoE
(softmax top-k, renormalised) with 32 experts, top-4, hidden 64, is served in 9 windows of 512
tokens per rank. A token's favourite expert follows a Zipf law (s = 1.2) whose ranking rotates
every 3 windows (phases), so the hot experts change while serving. Three copies of the layer
(same weights) serve the same tokens:

* ``none``: no replicas (DeepEP's contiguous layout, 32 slots);
* ``static``: 48 slots placed once by EPLB from the first window's counts;
* ``online``: 48 slots, ``MoELayer.rebalance()`` after every window from that window's counts
  (the placement used in window w was computed from window w - 1);
* ``online>5%``: the same with ``min_improvement=0.05``: it moves only when the busiest rank's
  expected load drops by 5% or more, so count noise inside a phase does not move weights.

Columns: each copy's observed busiest rank over the mean ((token, slot) pairs its experts
served), then the bytes the two online copies' rebalances moved (whole group), and the wall
time of ``online``'s rebalance on this machine (placement, agreement rounds and the fetch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.distributed as dist

import flexep
from flexep.launch import run_local
from flexep.moe import MoEConfig, MoELayer

CFG = MoEConfig(hidden=64, intermediate=32, num_experts=32, topk=4, routing="softmax_topk", renormalize=True)
WORLD, PHYSICAL, TOKENS, WINDOWS, PHASE, ZIPF_S = 4, 48, 512, 9, 3, 1.5


def favourites(window: int, rank: int) -> torch.Tensor:
    """[TOKENS] favourite expert per token: Zipf over a ranking that rotates every PHASE windows."""
    phase = window // PHASE
    ranking = torch.randperm(CFG.num_experts, generator=torch.Generator().manual_seed(100 + phase))
    popularity = 1.0 / torch.arange(1, CFG.num_experts + 1, dtype=torch.float64) ** ZIPF_S
    gen = torch.Generator().manual_seed(10_000 * window + rank)
    return ranking[torch.multinomial(popularity, TOKENS, replacement=True, generator=gen)]


def tokens(layer: MoELayer, window: int, rank: int) -> torch.Tensor:
    """[TOKENS, H]: noise pulled towards each token's favourite expert's gate row."""
    gen = torch.Generator().manual_seed(20_000 * window + rank)
    rows = layer.gate_weight.detach()[favourites(window, rank)]
    return torch.randn(TOKENS, CFG.hidden, generator=gen) * 0.5 + 2.5 * rows / rows.norm(dim=1, keepdim=True)


def observed_imbalance(layer: MoELayer) -> float:
    load = layer.tokens_per_slot.sum().view(1).double()
    every = [torch.zeros_like(load) for _ in range(WORLD)]
    dist.all_gather(every, load)
    per_rank = torch.cat(every)
    return float(per_rank.max() / per_rank.mean())


def _worker(rank: int, world: int) -> list:
    buf = flexep.Buffer(dist.group.WORLD, ranks_per_node=2)
    none = MoELayer(CFG, buf, seed=1)
    online = MoELayer(CFG, buf, seed=1)
    thrifty = MoELayer(CFG, buf, seed=1)
    static = None
    rows = []
    for window in range(WINDOWS):
        x = tokens(online, window, rank)
        if static is None:  # the first window's counts place the static copy once
            with torch.no_grad():
                online(x)
            load = online.collect_load()
            static = MoELayer(CFG, buf, seed=1)
            for layer in (static, online, thrifty):
                layer.rebalance(load.double(), num_physical=PHYSICAL)
        row = dict(window=window, phase=window // PHASE)
        copies = (("none", none), ("static", static), ("online", online), ("online>5%", thrifty))
        for name, layer in copies:
            layer.tokens_per_slot.zero_()
            with torch.no_grad():
                layer(x)
            row[name] = observed_imbalance(layer)
        dist.barrier()
        start = time.perf_counter()
        report = online.rebalance()  # this window's counts, for the next window
        row.update(moved_bytes=report.moved.bytes, moved_rows=report.moved.rows, applied=report.applied,
                   rebalance_ms=(time.perf_counter() - start) * 1e3)
        kept = thrifty.rebalance(min_improvement=0.05)
        row.update(thrifty_moved_bytes=kept.moved.bytes, thrifty_applied=kept.applied)
        static.collect_load()
        none.collect_load()
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON lines only")
    args = parser.parse_args(argv)
    rows = run_local(_worker, WORLD, timeout=600)[0]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"{'window':>6} {'phase':>5} | {'none':>6} {'static':>6} {'online':>6} {'>5%':>6} | "
          f"{'online moved B':>14} {'>5% moved B':>11} | {'ms':>5}")
    for r in rows:
        print(f"{r['window']:>6} {r['phase']:>5} | {r['none']:>6.3f} {r['static']:>6.3f} {r['online']:>6.3f} "
              f"{r['online>5%']:>6.3f} | {r['moved_bytes']:>14} {r['thrifty_moved_bytes']:>11} | "
              f"{r['rebalance_ms']:>5.1f}")
    later = rows[1:]
    copies = ("none", "static", "online", "online>5%")
    mean = {k: round(sum(r[k] for r in later) / len(later), 3) for k in copies}

    def total(key: str) -> int:
        return sum(r[key] for r in rows)
    moves = dict(online=(total("applied"), total("moved_bytes")),
                 thrifty=(total("thrifty_applied"), total("thrifty_moved_bytes")))
    print(f"\nmean busiest/mean over windows 1..{WINDOWS - 1}: {json.dumps(mean)}")
    print(f"moves after windows 0..{WINDOWS - 1} (count, bytes): online {moves['online']}, "
          f"online>5% {moves['thrifty']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
