"""EPLB on skewed (Zipf) expert loads: the busiest rank's load over the mean, before and after.

Reproduce:  python benchmarks/eplb_balance.py            (table + one JSON line per row)
            python benchmarks/eplb_balance.py --json     (JSON only)

Pure computation, a few seconds on a laptop. For each setting, expert popularity follows a Zipf
law (the expert of popularity rank i has weight 1 / i^s, shuffled over expert ids); 16k tokens
each draw 8 distinct experts from it. The per-expert counts of that batch are the load statistics
EPLB sees. "before" is DeepEP's contiguous layout (rank r holds experts [r*E/W, (r+1)*E/W));
"after" adds P - E redundant replicas with flexep.eplb. Two numbers per placement:

* stats: max/mean rank load on the statistics batch, each expert's load split evenly over its
  replicas (what the placement optimises);
* fresh: a second, independent batch routed with ``Placement.to_physical`` (round-robin replica
  choice), counting the (token, expert) entries each rank serves.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from flexep.eplb import Placement, rank_loads, rebalance

SETTINGS = [  # (experts, physical slots, ranks, groups, nodes, zipf exponent)
    (64, 64, 8, 8, 1, 1.0),
    (64, 80, 8, 8, 1, 1.0),
    (64, 80, 8, 8, 2, 1.0),
    (256, 288, 32, 8, 4, 1.0),
    (256, 288, 32, 8, 4, 1.5),
    (256, 320, 64, 8, 8, 1.0),
    (256, 288, 32, 8, 1, 1.0),
    (256, 320, 64, 8, 1, 1.0),
]


def zipf_load(num_experts: int, s: float, seed: int = 0) -> torch.Tensor:
    load = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** s
    return load[torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))]


def sample_topk(load: torch.Tensor, tokens: int, topk: int, seed: int = 1) -> torch.Tensor:
    """``[tokens, topk]`` distinct experts per token, drawn with probability ~ load."""
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(load.float().expand(tokens, -1), topk, replacement=False, generator=gen)


def measured_load(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.bincount(topk_idx.flatten(), minlength=num_experts).double()


def sampled_imbalance(placement: Placement, topk_idx: torch.Tensor) -> float:
    physical = placement.to_physical(topk_idx)
    rank = physical // placement.experts_per_rank
    per_rank = torch.bincount(rank.flatten(), minlength=placement.num_ranks).double()
    return float(per_rank.max() / per_rank.mean())


def imbalance(load: torch.Tensor, placement: Placement) -> float:
    per_rank = rank_loads(load, placement)
    return float(per_rank.max() / per_rank.mean())


def run(tokens: int = 16384, topk: int = 8) -> list:
    rows = []
    for experts, physical, ranks, groups, nodes, s in SETTINGS:
        popularity = zipf_load(experts, s)
        load = measured_load(sample_topk(popularity, tokens, topk, seed=1), experts)
        fresh = sample_topk(popularity, tokens, topk, seed=2)
        before = Placement.identity(experts, ranks)
        start = time.perf_counter()
        after = rebalance(load, physical, ranks, groups, nodes)
        ms = (time.perf_counter() - start) * 1e3
        rows.append(dict(
            experts=experts, physical=physical, ranks=ranks, nodes=nodes, zipf_s=s,
            policy="hierarchical" if nodes > 1 and groups % nodes == 0 else "global",
            stats_before=round(imbalance(load, before), 3),
            stats_after=round(imbalance(load, after), 3),
            fresh_before=round(sampled_imbalance(before, fresh), 3),
            fresh_after=round(sampled_imbalance(after, fresh), 3),
            max_replicas=int(after.replica_counts.max()), placement_ms=round(ms, 1)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON lines only")
    args = parser.parse_args()
    rows = run()
    if not args.json:
        print(f"{'E':>4} {'P':>4} {'W':>3} {'N':>2} {'s':>4} {'policy':>12} | {'stats before':>15} "
              f"{'after':>6} | {'fresh before':>14} {'after':>6} | {'max rep':>7} {'ms':>6}")
        for r in rows:
            print(f"{r['experts']:>4} {r['physical']:>4} {r['ranks']:>3} {r['nodes']:>2} {r['zipf_s']:>4} "
                  f"{r['policy']:>12} | {r['stats_before']:>15.3f} {r['stats_after']:>6.3f}"
                  f" | {r['fresh_before']:>14.3f} {r['fresh_after']:>6.3f} | {r['max_replicas']:>7} "
                  f"{r['placement_ms']:>6.1f}")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
