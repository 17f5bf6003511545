"""Serve a checkpoint from ``train_tiny_moe.py`` at a different EP size, decoding in low-latency mode.

    python examples/train_tiny_moe.py --ranks 4 --out /tmp/flexep_tiny_moe
    python examples/serve_decode.py --ranks 2 --ckpt /tmp/flexep_tiny_moe

Each rank loads only its experts from the per-expert checkpoint. With ``--redundant N`` (default
2) the training run's expert loads drive an EPLB placement with N extra replicas of hot experts.
Then every rank decodes ``--batch`` toy sequences for ``--steps`` steps: one token per sequence
per step through ``low_latency_dispatch`` / ``low_latency_combine`` (fixed capacity, no host
sync), checked against the normal-mode path on the same tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_moe_model import CONFIG, TinyMoEModel, teacher_batch  # noqa: E402

import flexep  # noqa: E402
from flexep import checkpoint  # noqa: E402
from flexep.eplb import Placement, rank_loads, rebalance  # noqa: E402
from flexep.launch import run_local  # noqa: E402


def serve(rank: int, world: int, ckpt: str, redundant: int, batch: int, steps: int) -> dict:
    load = torch.load(os.path.join(ckpt, "expert_load.pt"))
    physical = CONFIG.num_experts + redundant
    contiguous = Placement.identity(CONFIG.num_experts, world)
    placement = rebalance(load, physical, world) if redundant else contiguous
    capacity = 8  # decode tokens per rank per step (>= batch)
    hint = flexep.Buffer.get_low_latency_rdma_size_hint(capacity, CONFIG.hidden, world, physical)
    buffer = flexep.Buffer(dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True)
    model = TinyMoEModel(buffer, placement, seed=1, num_max_dispatch_tokens_per_rank=capacity)
    checkpoint.load(model, ckpt)
    model.eval()
    with torch.inference_mode():
        # Held-out loss through the normal (prefill) path on one global batch of 256 tokens, each
        # rank its shard: the training run's level, and the same at every EP size.
        x, y = (t.chunk(world)[rank] for t in teacher_batch(10_000, 0, 256))
        loss = ((model(x, low_latency=False) - y) ** 2).sum() / (256 * CONFIG.hidden)
        dist.all_reduce(loss)
        tokens = torch.randn(batch, CONFIG.hidden, generator=torch.Generator().manual_seed(rank))
        times, worst = [], 0.0
        for _ in range(steps):
            start = time.perf_counter()
            out = model(tokens)  # low-latency path: the Buffer has low_latency_mode=True
            times.append(time.perf_counter() - start)
            worst = max(worst, float((out - model(tokens, low_latency=False)).abs().max()))
            tokens = F.rms_norm(out, (CONFIG.hidden,))  # the toy "next token"
    return dict(loss=float(loss), ms=1e3 * sorted(times)[len(times) // 2], worst=worst,
                replicas=placement.replica_counts.tolist(), rank_load=_imbalance(load, placement),
                contiguous_load=_imbalance(load, contiguous))


def _imbalance(load: torch.Tensor, placement: Placement) -> float:
    per_rank = rank_loads(load, placement)
    return float(per_rank.max() / per_rank.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="/tmp/flexep_tiny_moe")
    parser.add_argument("--ranks", type=int, default=2, help="EP size to serve at")
    parser.add_argument("--redundant", type=int, default=2, help="extra expert replicas (EPLB)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--steps", type=int, default=16, help="decode steps")
    args = parser.parse_args()
    if (CONFIG.num_experts + args.redundant) % args.ranks:
        parser.error(f"experts + redundant ({CONFIG.num_experts} + {args.redundant}) must be "
                     f"divisible by --ranks ({args.ranks})")
    start = time.perf_counter()
    res = run_local(serve, args.ranks, (args.ckpt, args.redundant, args.batch, args.steps), timeout=300)
    r0 = res[0]
    print(f"loaded {args.ckpt} at EP={args.ranks} with {args.redundant} redundant experts; "
          f"replicas per expert {r0['replicas']}")
    print(f"expected max/mean rank load from training stats: {r0['contiguous_load']:.3f} contiguous -> "
          f"{r0['rank_load']:.3f} EPLB")
    print(f"held-out loss (normal mode): {r0['loss']:.5f}")
    print(f"decode: {args.steps} steps x {args.batch} tokens per rank, low-latency mode, median step "
          + ", ".join(f"rank {i} {r['ms']:.2f} ms" for i, r in enumerate(res)))
    print(f"max |low-latency - normal| over all steps: {max(r['worst'] for r in res):.2e}")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
