"""What the ``flexep`` subcommands share: running on ranks, timing, summaries, wording, JSON.

* :func:`run_ranks` runs a worker on local Gloo ranks (spawned) or, under ``torchrun``, on the
  launched ranks with the backend of their device (NCCL, HCCL, XCCL, Gloo), and gathers every
  rank's result on every rank.
* :func:`timed` times one call on all ranks in lockstep (wall and process CPU time).
* :func:`slowest_median` turns per-rank samples into one figure per phase: the slowest rank of
  each iteration (an exchange is as slow as its slowest member), the median over iterations.
* :func:`compare` words a ratio as users read it: ``"1.4x slower than raw all_to_all"``.
* :func:`parse_channels` reads ``--channels`` (``default`` = the Buffer's own count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..comm.objects import all_gather_object
from ..launch import init_from_env, run_local

__all__ = ["under_torchrun", "run_ranks", "timed", "slowest_median", "compare", "write_json",
           "add_shape_args", "add_run_args", "parse_channels"]


def under_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (or any launcher setting RANK/WORLD_SIZE)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def run_ranks(worker: Callable[..., Any], world: int, args: Sequence = (), *, timeout: float = 3600,
              env: Optional[dict] = None) -> list:
    """``worker(rank, world, device, *args)`` on every rank; returns every rank's result.

    Locally: ``world`` spawned Gloo ranks on the CPU. Under torchrun: this process's rank on its
    own device (``world`` is taken from the launcher); results are gathered over a Gloo side
    group so that any result object can travel.
    """
    if not under_torchrun():
        return run_local(_local_worker, world, (worker, *args), timeout=timeout, env=env)
    device = init_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = worker(rank, world, device, *args)
    side = dist.new_group(backend="gloo")
    gathered = all_gather_object(side, out)
    dist.barrier(group=side)
    return gathered


def _local_worker(rank: int, world: int, worker: Callable, *args):
    return worker(rank, world, torch.device("cpu"), *args)


def timed(fn: Callable, *args, **kwargs) -> tuple:
    """``(fn(*args, **kwargs), (wall s, process CPU s))``, all ranks starting together.

    CPU time counts every thread of the rank (the backend's transfer threads too); where ranks
    outnumber cores it is the steadier measure of what a phase costs. On an accelerator the
    device is synchronised before the clock stops.
    """
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    _synchronize(out)
    return out, (time.perf_counter() - start, time.process_time() - cpu)


def _synchronize(out) -> None:
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    if isinstance(first, torch.Tensor) and first.device.type != "cpu":
        mod = getattr(torch, first.device.type, None)
        if mod is not None and hasattr(mod, "synchronize"):
            mod.synchronize()


def slowest_median(per_rank: Sequence[dict], which: int = 0) -> dict:
    """``{phase: seconds}``: per iteration the slowest rank, then the median over iterations.

    ``per_rank[r][phase]`` is a list of ``(wall, cpu)`` samples; ``which`` picks wall (0) or CPU (1).
    """
    out = {}
    for phase in per_rank[0]:
        iters = zip(*[r[phase] for r in per_rank])
        out[phase] = statistics.median(max(sample[which] for sample in it) for it in iters)
    return out


def compare(ours: float, theirs: float, what: str) -> str:
    """``"2.3x faster than <what>"``, ``"1.4x slower than <what>"`` or ``"as fast as <what>"``."""
    if ours <= 0 or theirs <= 0:
        return f"not comparable with {what}"
    ratio = theirs / ours
    if 0.995 <= ratio <= 1.005:
        return f"as fast as {what}"
    return f"{ratio:.1f}x faster than {what}" if ratio > 1 else f"{1 / ratio:.1f}x slower than {what}"


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    print(f"figures written to {path}")


def add_shape_args(p, *, tokens: Optional[int], hidden: int = 7168, experts: int = 256, topk: int = 8,
                   world: int = 4, tokens_help: Optional[str] = None) -> None:
    """The traffic shape every benchmark takes (DeepSeek-V3 by default)."""
    g = p.add_argument_group("traffic shape")
    g.add_argument("--world", type=int, default=world, help=f"local Gloo ranks to spawn (default {world}; "
                   "taken from the launcher under torchrun)")
    g.add_argument("--tokens", type=int, default=tokens,
                   help=tokens_help or f"tokens per rank (default {tokens})")
    g.add_argument("--hidden", type=int, default=hidden, help=f"hidden size (default {hidden})")
    g.add_argument("--experts", type=int, default=experts, help=f"experts (default {experts})")
    g.add_argument("--topk", type=int, default=topk, help=f"experts per token (default {topk})")
    g.add_argument("--fp8", action="store_true", help="dispatch FP8 e4m3 with per-128-channel scales "
                   "(low-latency mode always does, as DeepEP's default)")
    g.add_argument("--seed", type=int, default=0)


def add_run_args(p, *, iters: int) -> None:
    """How long to run and where to write the figures."""
    g = p.add_argument_group("run")
    g.add_argument("--iters", type=int, default=iters, help=f"timed iterations (default {iters})")
    g.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    g.add_argument("--quick", action="store_true", help="a short run that checks the set-up")
    g.add_argument("--json", metavar="PATH", help="also write the figures as JSON")


def parse_channels(text: str) -> tuple:
    """``"default,1,4"`` -> ``(None, 1, 4)`` (argparse ``type`` of ``--channels``)."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if part in ("default", "auto"):
            out.append(None)
        elif part.isdigit() and int(part) >= 1:
            out.append(int(part))
        else:
            raise argparse.ArgumentTypeError(
                f"takes positive counts or 'default', comma separated; got {text!r}")
    return tuple(dict.fromkeys(out))
