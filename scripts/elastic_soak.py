"""Random fault scenarios against the elastic served workload (a soak, not part of the suite).

    PYTHONPATH=. python scripts/elastic_soak.py --runs 20 --seed 1

Each run spawns 4 ranks of ``tests/elastic_workload.py`` in a random mode (normal or
low-latency, flat or 2 virtual nodes x 2) with one or two random faults: a random rank is
SIGKILLed, exits or is frozen (SIGSTOP, woken after the others moved on) at a random phase of a
random iteration, or at a random moment (a timer that may land in an agreement, while a group
forms or while weights move). A run passes when every request is answered with tokens
bitwise equal to the fault-free decode. Prints one line per run and the recovery times.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import elastic_workload as W  # noqa: E402

from flexep import checkpoint  # noqa: E402
from flexep.launch import free_port, run_local  # noqa: E402

PHASES = {"normal": ["before_header", "after_header", "before_payload", "after_payload", "after_rail",
                     "after_intra", "timer"],
          "ll": ["before_payload", "after_ll_dispatch", "before_recv_hook", "before_weights",
                 "after_ll_weights", "after_ll_combine", "timer"]}  # checks travel in-band: no header


def scenario(rng: random.Random) -> dict:
    mode = rng.choice(["normal", "ll"])
    victims = rng.sample(range(4), rng.choice([1, 1, 2]))
    faults = []
    for v in victims:
        phase = rng.choice(PHASES[mode])
        faults.append(dict(member=v, iteration=rng.randrange(0, W.STEPS - 1), phase=phase,
                           nth=rng.randint(1, 3), action=rng.choice(["kill", "exit", "stop"]),
                           delay=round(rng.uniform(0.0, 0.4), 3)))
    return dict(mode=mode, ranks_per_node=rng.choice([None, 2]), faults=faults,
                redundant=rng.choice([0, 4]), timeout=3.0)


def _change(c: dict) -> str:
    total = c["agree_s"] + c["form_s"] + c["restore_s"]
    return (f"{c['kind']} g{c['generation']} lost {list(c['lost'])} after {c['failed_after']:.2f} s, "
            f"recovered in {total:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    ckpt = f"/tmp/flexep_elastic_soak_{os.getpid()}"
    checkpoint.save(W.layer_for(dist.group.WORLD, "normal", W.initial_placement(1, 0)), ckpt)
    oracles = {m: W.oracle(m) for m in ("normal", "ll")}
    rng, failed = random.Random(args.seed), 0
    for run in range(args.runs):
        spec = dict(scenario(rng), checkpoint=ckpt)
        start = time.monotonic()
        res = run_local(W.serve_worker, 4, (spec,), timeout=240, allow_failures=True)
        done = [r for r in res if isinstance(r, dict) and r.get("is_member")]
        ok = bool(done) and all(torch.equal(r["tokens"], oracles[spec["mode"]]) for r in done)
        failed += not ok
        times = ", ".join(_change(c) for r in done[:1] for c in r["history"])
        print(f"run {run}: {'ok' if ok else 'FAILED'} {time.monotonic() - start:.0f} s {spec['mode']} "
              f"rpn={spec['ranks_per_node']} faults={spec['faults']} | {times}", flush=True)
        if not ok:
            for r in res:
                print("   ", str(r)[-1500:] if not isinstance(r, dict) else
                      {k: v for k, v in r.items() if k not in ("tokens",)}, flush=True)
    print(f"{args.runs - failed}/{args.runs} runs passed")


if __name__ == "__main__":
    main()
