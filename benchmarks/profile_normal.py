"""Where one normal-mode call spends its time at small sizes (the numbers in docs/profile.md).

    python benchmarks/profile_normal.py                 # world 4, T = 1, 8, 64; H = 256, 7168
    python benchmarks/profile_normal.py --iters 50 --json profile.json

Every rank runs ``get_dispatch_layout``, ``dispatch`` and ``combine`` of DeepSeek-V3-shaped
routing (top-8 of 256 experts) in lockstep; the library's own functions are wrapped (nothing in
flexep is changed) to time each phase of each call. Phases nest: "control round" includes the
time its exchange waits for the slowest peer, which on a shared host is mostly the other ranks
catching up. Figures are medians over iterations, in microseconds, of the slowest rank.
"""

from __future__ import annotations

import argparse
import collections
import functools
import inspect
import json
import statistics
import time

import torch
import torch.distributed as dist

import flexep
from flexep.launch import run_local

# (label, module path, attribute path): the wrapped functions, in call order.
PHASES = (
    ("request + structure checks", "flexep.core.communicator", "Communicator._build"),
    ("value checks (device flags)", "flexep.core.checks", "dispatch_value_flags"),
    ("control rounds (incl. waits)", "flexep.comm.control", "ControlPlane.round"),
    ("stage: gather + pack rows", "flexep.algorithms.flat", "Flat.stage"),
    ("payload exchanges (incl. waits)", "flexep.algorithms.flat", "exchange"),
    ("unpack received metadata", "flexep.algorithms.flat", "finish_receive"),
    ("combine reduction", "flexep.algorithms.flat", "sum_blocks"),
)


def _wrap(acc: dict) -> None:
    import importlib

    for label, module, path in PHASES:
        owner = importlib.import_module(module)
        *parents, name = path.split(".")
        for p in parents:
            owner = getattr(owner, p)
        fn = getattr(owner, name)
        static = inspect.isclass(owner) and isinstance(inspect.getattr_static(owner, name), staticmethod)

        def timed(*a, _fn=fn, _label=label, **k):
            start = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc[_label] += time.perf_counter() - start
        wrapped = functools.wraps(fn)(timed)
        setattr(owner, name, staticmethod(wrapped) if static else wrapped)


def _worker(rank: int, world: int, tokens: int, hidden: int, iters: int) -> dict:
    acc: dict = collections.defaultdict(float)
    _wrap(acc)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    topk = torch.rand(tokens, 256, generator=gen).topk(8, 1).indices
    w = torch.rand(tokens, 8, generator=gen)
    buf = flexep.Buffer(dist.group.WORLD)
    samples: dict = collections.defaultdict(list)
    for it in range(iters + 3):
        acc.clear()
        dist.barrier()
        t0 = time.perf_counter()
        lay = buf.get_dispatch_layout(topk, 256)
        t1 = time.perf_counter()
        recv_x, _, _, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3],
                                                  num_tokens_per_expert=lay[2], topk_idx=topk, topk_weights=w)
        t2 = time.perf_counter()
        buf.combine(recv_x, handle)
        t3 = time.perf_counter()
        if it >= 3:  # warm-up: first calls size buffers and the control round
            samples["get_dispatch_layout"].append(t1 - t0)
            samples["dispatch (total)"].append(t2 - t1)
            samples["combine (total)"].append(t3 - t2)
            for label, _, _ in PHASES:
                samples[label].append(acc[label])
    return samples


def profile(world: int, tokens: int, hidden: int, iters: int) -> dict:
    per_rank = run_local(_worker, world, (tokens, hidden, iters), timeout=900)
    return {phase: statistics.median(max(r[phase][i] for r in per_rank) for i in range(iters)) * 1e6
            for phase in per_rank[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args()
    shapes = [(t, h) for h in (256, 7168) for t in (1, 8, 64)]
    table = {f"{t}x{h}": profile(a.world, t, h, a.iters) for t, h in shapes}
    phases = list(next(iter(table.values())))
    print(f"µs per call, world {a.world} Gloo, top-8 of 256, bf16; median over {a.iters} iterations of the "
          "slowest rank")
    print(f"{'phase':<32}" + "".join(f"{k:>12}" for k in table))
    for phase in phases:
        print(f"{phase:<32}" + "".join(f"{table[k][phase]:>12.0f}" for k in table))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
