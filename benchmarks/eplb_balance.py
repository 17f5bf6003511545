"""EPLB balance: flexep's placements against DeepSeek's ``rebalance_experts`` on a grid of Zipf loads.

Reproduce:  python benchmarks/eplb_balance.py            (tables, then a summary)
            python benchmarks/eplb_balance.py --json     (one JSON line per case)
            python benchmarks/eplb_balance.py --seeds 4  (four load draws per case)

Pure computation (about a minute on one core, most of it in the float32 baseline). The grid: 256
experts in 8 groups; Zipf exponent s = 0.5, 1.0, 1.5; (physical slots, ranks) = (288, 32),
(320, 32), (320, 64) (288 slots do not split over 64 ranks); 1, 4 and 8 nodes; the hierarchical
and the global policy: 54 cases. The global policy ignores the node count, so its rows repeat
across nodes. Two load models, each a table:

* ``expected``: each expert's Zipf popularity (the expert of popularity rank i weighs 1 / i^s,
  ranks shuffled over expert ids);
* ``sampled``: the per-expert counts of one batch of 16,384 tokens, each drawing 8 distinct
  experts with those probabilities (what a serving system observes).

Columns: the busiest rank's load over the mean with no replicas (``none``), with DeepSeek's
algorithm (``deepseek``, restated in ``deepseek_eplb.py``) and with flexep's
(``flexep``); their ratio; replicas of one expert sharing a rank (DeepSeek, flexep, and the
least possible for the replica counts, ``min``: an expert with more replicas than its domain has
ranks must double up); flexep's planning time. Rank loads are exactly rounded sums
(``math.fsum``), so equal loads compare equal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from deepseek_eplb import deepseek_rebalance  # noqa: E402

from flexep.moe.eplb import Placement, global_placement, hierarchical_placement  # noqa: E402

NUM_EXPERTS, NUM_GROUPS = 256, 8
EXPONENTS = (0.5, 1.0, 1.5)
SHAPES = ((288, 32), (320, 32), (320, 64))  # (physical slots, ranks)
NODES = (1, 4, 8)
POLICIES = ("hierarchical", "global")
LOAD_MODELS = ("expected", "sampled")


def zipf_popularity(num_experts: int, s: float, seed: int) -> torch.Tensor:
    """``[E] float64``: weight 1 / i^s for popularity rank i, ranks shuffled over expert ids."""
    weights = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** s
    return weights[torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))]


def sampled_load(popularity: torch.Tensor, seed: int, tokens: int = 16384, topk: int = 8) -> torch.Tensor:
    """``[E] float64`` counts of a batch whose tokens draw ``topk`` distinct experts each."""
    gen = torch.Generator().manual_seed(seed + 1)
    idx = torch.multinomial(popularity.float().expand(tokens, -1), topk, replacement=False, generator=gen)
    return torch.bincount(idx.flatten(), minlength=popularity.numel()).double()


def case_load(model: str, s: float, seed: int) -> torch.Tensor:
    popularity = zipf_popularity(NUM_EXPERTS, s, seed)
    return popularity if model == "expected" else sampled_load(popularity, seed)


def imbalance(load: torch.Tensor, physical_to_logical: list[int], num_ranks: int) -> float:
    """Busiest rank over the mean, each expert's load split evenly over its replicas."""
    counts = torch.bincount(torch.tensor(physical_to_logical), minlength=load.numel()).tolist()
    values = load.tolist()
    per_slot = [values[e] / counts[e] for e in physical_to_logical]
    size = len(per_slot) // num_ranks
    ranks = [math.fsum(sorted(per_slot[r * size:(r + 1) * size])) for r in range(num_ranks)]
    return max(ranks) / (math.fsum(values) / num_ranks)


def colocated(physical_to_logical: list[int], num_ranks: int) -> int:
    size = len(physical_to_logical) // num_ranks
    return sum(size - len(set(physical_to_logical[r * size:(r + 1) * size])) for r in range(num_ranks))


def least_colocated(physical_to_logical: list[int], ranks_per_domain: int) -> int:
    """Replicas beyond one per rank of the expert's domain (node, or all ranks): unavoidable."""
    counts = torch.bincount(torch.tensor(physical_to_logical)).tolist()
    return sum(max(0, c - ranks_per_domain) for c in counts)


def run_case(model: str, s: float, num_physical: int, num_ranks: int, num_nodes: int, policy: str,
             seed: int = 0) -> dict:
    """One grid case: DeepSeek's and flexep's placements of the same load, measured alike."""
    load = case_load(model, s, seed)
    hierarchical = policy == "hierarchical"
    groups, nodes = (NUM_GROUPS, num_nodes) if hierarchical else (1, 1)
    theirs = deepseek_rebalance(load, num_physical, groups, nodes, num_ranks)
    start = time.perf_counter()
    if hierarchical:
        ours = hierarchical_placement(load, num_physical, num_ranks, groups, nodes)
    else:
        ours = global_placement(load, num_physical, num_ranks)
    ms = (time.perf_counter() - start) * 1e3
    mine = ours.physical_to_logical.tolist()
    identity = Placement.identity(NUM_EXPERTS, num_ranks).physical_to_logical.tolist()
    deepseek, flexep = imbalance(load, theirs, num_ranks), imbalance(load, mine, num_ranks)
    return dict(load=model, zipf_s=s, physical=num_physical, ranks=num_ranks, nodes=num_nodes,
                policy=policy, seed=seed, none=imbalance(load, identity, num_ranks), deepseek=deepseek,
                flexep=flexep, ratio=flexep / deepseek, colocated_deepseek=colocated(theirs, num_ranks),
                colocated_flexep=colocated(mine, num_ranks),
                colocated_min=least_colocated(mine, num_ranks // nodes), flexep_ms=ms)


def grid() -> list[tuple]:
    """The 54 (s, physical, ranks, nodes, policy) cases."""
    return [(s, p, w, n, policy) for s in EXPONENTS for p, w in SHAPES for n in NODES for policy in POLICIES]


def print_table(rows: list[dict]) -> None:
    print(f"{'s':>4} {'P':>4} {'W':>3} {'N':>2} {'policy':>12} | {'none':>6} {'deepseek':>8} "
          f"{'flexep':>7} {'ratio':>6} | {'co-located ds/fx/min':>20} | {'ms':>5}")
    for r in rows:
        co = f"{r['colocated_deepseek']}/{r['colocated_flexep']}/{r['colocated_min']}"
        print(f"{r['zipf_s']:>4} {r['physical']:>4} {r['ranks']:>3} {r['nodes']:>2} {r['policy']:>12} | "
              f"{r['none']:>6.3f} {r['deepseek']:>8.4f} {r['flexep']:>7.4f} {r['ratio']:>6.4f} | {co:>20} | "
              f"{r['flexep_ms']:>5.0f}")


def summarize(rows: list[dict]) -> dict:
    worst = max(rows, key=lambda r: r["ratio"])
    return dict(cases=len(rows), worse_than_deepseek=sum(r["flexep"] > r["deepseek"] for r in rows),
                better_than_deepseek=sum(r["flexep"] < r["deepseek"] for r in rows),
                worst_ratio=worst["ratio"], best_ratio=min(r["ratio"] for r in rows),
                colocated_deepseek=sum(r["colocated_deepseek"] for r in rows),
                colocated_flexep=sum(r["colocated_flexep"] for r in rows),
                colocated_min=sum(r["colocated_min"] for r in rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON lines only")
    parser.add_argument("--seeds", type=int, default=1, help="load draws per case (default 1)")
    args = parser.parse_args(argv)
    rows = []
    for model in LOAD_MODELS:
        part = [run_case(model, *case, seed=seed) for seed in range(args.seeds) for case in grid()]
        rows += part
        if not args.json:
            print(f"\nload model: {model} ({len(part)} cases)")
            print_table(part)
    summary = summarize(rows)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print("\nsummary:", json.dumps(summary))
    return 1 if summary["worse_than_deepseek"] else 0


if __name__ == "__main__":
    sys.exit(main())
