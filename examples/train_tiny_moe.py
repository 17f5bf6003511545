"""Train a tiny DeepSeek-V3-style MoE model with expert parallelism on local CPU ranks, then save it.

    python examples/train_tiny_moe.py --ranks 4 --steps 60 --out /tmp/flexep_tiny_moe

Each of the ``--ranks`` Gloo processes holds 16 / ranks experts and its own shard of every batch
(expert parallelism = data parallelism, as in DeepSeek-V3). Tokens reach their experts through
flexep's normal-mode dispatch and combine, gradients flow back through them, the router and the
shared expert are replicated (their gradients are all-reduced), and the routing bias is updated
without an auxiliary loss. The checkpoint is keyed by logical expert, so ``serve_decode.py`` can
load it at another EP size; ``expert_load.pt`` (tokens per expert) feeds its EPLB placement.

Losing a rank (:mod:`flexep.elastic`):

    python examples/train_tiny_moe.py --ranks 4 --steps 30 --kill-rank 2 --at-step 17
    python examples/train_tiny_moe.py --ranks 3 --steps 30 --resume /tmp/flexep_tiny_moe/elastic/step-000010

The first run writes model + optimizer checkpoints every ``--ckpt-every`` steps; rank 2 is
SIGKILLed at the start of step 17; the survivors detect it, agree on a new membership, form an
EP group of 3 and continue from the last checkpoint (step 10) without restarting. With 3 ranks
the 16 experts take 18 slots (two replicas, whose gradients are summed). The second run starts
at EP size 3 from that checkpoint: its loss curve is the one the survivors printed, bit for bit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_moe_model import CONFIG, TinyMoEModel, teacher_batch  # noqa: E402

import flexep  # noqa: E402
from flexep import checkpoint  # noqa: E402
from flexep.elastic import (  # noqa: E402
    ElasticEP,
    is_failure,
    latest_step,
    load_state,
    save_state,
    training_placement,
)
from flexep.launch import run_local  # noqa: E402
from flexep.moe import all_reduce_replicated_grads, sync_replica_grads  # noqa: E402


def build(ep: ElasticEP):
    """Model and optimizer for the current membership (placement: see training_placement)."""
    buffer = flexep.Buffer(ep.group, **ep.gen.buffer_kwargs())
    model = TinyMoEModel(buffer, training_placement(CONFIG.num_experts, ep.world), seed=0)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)


def train_step(model, opt, ep: ElasticEP, step: int, tokens_per_rank: int):
    x, y = teacher_batch(step, ep.rank, tokens_per_rank)
    # Normalised by the global element count, so summed gradients are the global mean's.
    loss = ((model(x) - y) ** 2).sum() / (y.numel() * ep.world)
    opt.zero_grad()
    loss.backward()
    all_reduce_replicated_grads(model, ep.group)  # router, shared expert, head
    sync_replica_grads(model.moe)  # expert replicas (only when EP does not divide the experts)
    opt.step()
    load = model.moe.update_routing_bias()  # aux-loss-free balancing; global tokens per expert
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss, group=ep.group)
    return float(global_loss), load


def train(rank: int, world: int, steps: int, tokens_per_rank: int, out: str, kill: tuple,
          ckpt_every: int, resume: str, timeout: float) -> dict:
    ep = ElasticEP(timeout=timeout)
    model, opt = build(ep)
    step = load_state(model, opt, resume) if resume else 0
    root = os.path.join(out, "elastic")
    total_load = torch.zeros(CONFIG.num_experts, dtype=torch.int64)
    log, events, start = [], [], time.perf_counter()
    while step < steps:
        try:
            if (ep.member, step) == kill:
                ep.store.set("example/kill_time", repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            loss, load = train_step(model, opt, ep, step, tokens_per_rank)
            total_load += load
            log.append((step, ep.world, loss, float(load.max() / load.double().mean()),
                        time.perf_counter() - start))
            step += 1
            if ckpt_every and step % ckpt_every == 0:
                save_state(model, opt, root, step, ep.group)
        except Exception as exc:  # noqa: BLE001 - only peer failures are recovered
            if not is_failure(exc) or latest_step(root) is None:
                raise
            failed_at = step
            ep.recover(exc)
            loaded = time.monotonic()
            model, opt = build(ep)
            step = load_state(model, opt, root)
            change = ep.history[-1]
            events.append(dict(failed_at=failed_at, resumed_at=step, world=ep.world, lost=change.lost,
                               detected_at=change.detected_at, agree_s=change.agree_s, form_s=change.form_s,
                               load_s=time.monotonic() - loaded,
                               kill_time=float(ep.store.get("example/kill_time"))))
    checkpoint.save(model, out, ep.group)
    if ep.rank == 0:
        torch.save(total_load, os.path.join(out, "expert_load.pt"))
    ep.leave()
    return dict(log=log, events=events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4, help="EP size (local Gloo processes)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--tokens-per-rank", type=int, default=64)
    parser.add_argument("--out", default="/tmp/flexep_tiny_moe", help="checkpoint directory")
    parser.add_argument("--kill-rank", type=int, default=None, help="SIGKILL this rank ...")
    parser.add_argument("--at-step", type=int, default=None, help="... at the start of this step")
    parser.add_argument("--ckpt-every", type=int, default=None,
                        help="training checkpoints (model + optimizer) every N steps (default: 10 with "
                             "--kill-rank, else none)")
    parser.add_argument("--resume", default=None, help="a step-<n> training checkpoint to start from")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a silent rank is lost")
    args = parser.parse_args()
    if (args.kill_rank is None) != (args.at_step is None):
        parser.error("--kill-rank and --at-step go together")
    kill = (args.kill_rank, args.at_step) if args.kill_rank is not None else (-1, -1)
    ckpt_every = args.ckpt_every if args.ckpt_every is not None else (10 if args.kill_rank is not None else 0)
    if args.kill_rank is not None and not 0 < ckpt_every <= args.at_step:
        parser.error("--kill-rank needs a checkpoint before --at-step (--ckpt-every <= --at-step)")
    start = time.perf_counter()
    res = run_local(train, args.ranks, (args.steps, args.tokens_per_rank, args.out, kill, ckpt_every,
                                        args.resume, args.timeout), timeout=600, allow_failures=True)
    survivors = [r for r in res if isinstance(r, dict)]
    if len(survivors) < len(res) - (args.kill_rank is not None):
        raise SystemExit("\n".join(str(r) for r in res if not isinstance(r, dict)))
    first = survivors[0]
    print(f"trained {CONFIG.num_experts} experts (top-{CONFIG.topk}) on EP={args.ranks} Gloo ranks, "
          f"{args.tokens_per_rank} tokens per rank per step")
    for e in first["events"]:
        print(f"rank {args.kill_rank} was killed at step {e['failed_at']}; the survivors detected it "
              f"{e['detected_at'] - e['kill_time']:.2f} s later, agreed on members in {e['agree_s']:.3f} s, "
              f"formed EP={e['world']} in {e['form_s']:.3f} s, loaded the step-{e['resumed_at']} checkpoint "
              f"in {e['load_s']:.3f} s and continued from step {e['resumed_at']}")
    print(f"{'step':>5} {'EP':>3} {'loss':>9} {'max/mean expert load':>21} {'time s':>7}")
    for step, ep_size, loss, imbalance, seconds in first["log"]:
        if step % 10 == 0 or step == args.steps - 1 or first["events"] or args.resume:
            print(f"{step:>5} {ep_size:>3} {loss:>9.5f} {imbalance:>21.2f} {seconds:>7.2f}")
    files = sorted(os.listdir(args.out))
    print(f"saved {args.out}: {', '.join(files)}")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
