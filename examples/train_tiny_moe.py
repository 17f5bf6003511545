"""Train a tiny DeepSeek-V3-style MoE model with expert parallelism on local CPU ranks, then save it.

    python examples/train_tiny_moe.py --ranks 4 --steps 60 --out /tmp/flexep_tiny_moe

Each of the ``--ranks`` Gloo processes holds 16 / ranks experts and its own shard of every batch
(expert parallelism = data parallelism, as in DeepSeek-V3). Tokens reach their experts through
flexep's normal-mode dispatch and combine, gradients flow back through them, the router and the
shared expert are replicated (their gradients are all-reduced), and the routing bias is updated
without an auxiliary loss. The checkpoint is keyed by logical expert, so ``serve_decode.py`` can
load it at another EP size; ``expert_load.pt`` (tokens per expert) feeds its EPLB placement.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_moe_model import CONFIG, TinyMoEModel, teacher_batch  # noqa: E402

import flexep  # noqa: E402
from flexep import checkpoint  # noqa: E402
from flexep.launch import run_local  # noqa: E402
from flexep.moe import all_reduce_replicated_grads  # noqa: E402


def train(rank: int, world: int, steps: int, tokens_per_rank: int, out: str) -> list:
    group = dist.group.WORLD
    model = TinyMoEModel(flexep.Buffer(group), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    total_load = torch.zeros(CONFIG.num_experts, dtype=torch.int64)
    log, start = [], time.perf_counter()
    for step in range(steps):
        x, y = teacher_batch(step, rank, tokens_per_rank)
        # Normalised by the global element count, so summed gradients are the global mean's.
        loss = ((model(x) - y) ** 2).sum() / (y.numel() * world)
        opt.zero_grad()
        loss.backward()
        all_reduce_replicated_grads(model, group)  # router, shared expert, head
        opt.step()
        load = model.moe.update_routing_bias()  # aux-loss-free balancing; global tokens per expert
        total_load += load
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        if step % 10 == 0 or step == steps - 1:
            log.append((step, float(global_loss), float(load.max() / load.double().mean()),
                        time.perf_counter() - start))
    checkpoint.save(model, out, group)
    if rank == 0:
        torch.save(total_load, os.path.join(out, "expert_load.pt"))
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4, help="EP size (local Gloo processes)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--tokens-per-rank", type=int, default=64)
    parser.add_argument("--out", default="/tmp/flexep_tiny_moe", help="checkpoint directory")
    args = parser.parse_args()
    start = time.perf_counter()
    log = run_local(train, args.ranks, (args.steps, args.tokens_per_rank, args.out), timeout=300)[0]
    print(f"trained {CONFIG.num_experts} experts (top-{CONFIG.topk}) on EP={args.ranks} Gloo ranks, "
          f"{args.tokens_per_rank} tokens per rank per step")
    print(f"{'step':>5} {'loss':>9} {'max/mean expert load':>21} {'time s':>7}")
    for step, loss, imbalance, seconds in log:
        print(f"{step:>5} {loss:>9.5f} {imbalance:>21.2f} {seconds:>7.2f}")
    files = sorted(os.listdir(args.out))
    print(f"saved {args.out}: {', '.join(files)}")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
