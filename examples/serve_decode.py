"""Serve a checkpoint from ``train_tiny_moe.py`` at a different EP size, decoding in low-latency mode.

    python examples/train_tiny_moe.py --ranks 4 --out /tmp/flexep_tiny_moe
    python examples/serve_decode.py --ranks 2 --ckpt /tmp/flexep_tiny_moe

Each rank loads only its experts from the per-expert checkpoint. With ``--redundant N`` (default
2) the training run's expert loads drive an EPLB placement with N extra replicas of hot experts.
Then ``--batch`` toy requests per rank are decoded for ``--steps`` tokens each: one token per
request per step through ``low_latency_dispatch`` / ``low_latency_combine`` (fixed capacity, no
host sync), checked against the normal-mode path on the same tokens. Every generated token is
posted to a frontend (the launcher's store, which outlives the ranks, as an API server would).

Losing a rank while serving (:mod:`flexep.elastic`):

    python examples/serve_decode.py --ranks 4 --redundant 4 --kill-rank 1 --at-step 5

runs the workload twice: fault-free, then with rank 1 SIGKILLed at the start of decode step 5.
The survivors detect the loss, agree on a new membership, form an EP group of 3, give every
expert of the lost rank a live copy (moved from a surviving replica, or read from the
checkpoint), take over its requests from their last posted token and re-run the failed step.
Every token is then compared with the fault-free run: with the slot-wise combine they are equal
bit for bit. ``--policy mask`` / ``renormalize`` serve on with the lost experts masked instead
(faster recovery, different tokens; see docs/elastic.md).

``--fault stop`` freezes the rank (SIGSTOP) instead: the others time out, exclude it and go on;
once they have formed the new group they wake it (SIGCONT), it finds itself excluded
(``StaleGenerationError``), rejoins as a new member and is admitted between two steps. A rank
that was excluded and is still there when the work is done is killed by the survivors (fenced).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_moe_model import CONFIG, TinyMoEModel, teacher_batch  # noqa: E402

import flexep  # noqa: E402
from flexep.elastic import POLICIES, ElasticEP, ElasticMoE, TokenStreams  # noqa: E402
from flexep.eplb import Placement, rank_loads, rebalance  # noqa: E402
from flexep.errors import StaleGenerationError  # noqa: E402
from flexep.launch import run_local  # noqa: E402


def prompt(i: int) -> torch.Tensor:
    return torch.randn(CONFIG.hidden, generator=torch.Generator().manual_seed(1000 + i))


def decode_step(ep: ElasticEP, moe: ElasticMoE, front: TokenStreams, cache: dict, requests: int,
                stats: dict) -> int:
    """Advance this rank's requests (contiguous blocks by EP rank) by one token; return the
    tokens still to generate over all ranks. Re-runnable: state comes from ``cache`` or, after a
    membership change, from the frontend."""
    if cache.get("generation") != ep.generation:
        cache.clear()
        cache["generation"] = ep.generation
    mine = torch.tensor_split(torch.arange(requests), ep.world)[ep.rank].tolist()
    for i in mine:
        if i not in cache:
            n = front.count(i)
            cache[i] = (n, front.token(i, n - 1) if n else prompt(i))
    todo = [i for i in mine if cache[i][0] < front.steps]
    x = torch.stack([cache[i][1] for i in todo]) if todo else torch.zeros(0, CONFIG.hidden)
    start = time.perf_counter()
    out = moe(x)  # low-latency path: the Buffer has low_latency_mode=True
    stats["times"].append(time.perf_counter() - start)
    diff = (out - moe(x, low_latency=False)).abs()
    if todo:
        stats["worst"] = max(stats["worst"], float(diff.max()))
    for i, token in zip(todo, F.rms_norm(out, (CONFIG.hidden,))):  # the toy "next token"
        cache[i] = (cache[i][0] + 1, front.post(i, cache[i][0], token))
    return sum(v[0] for v in ep.gather([sum(front.steps - cache[i][0] for i in mine)]))


def serve(rank: int, world: int, ckpt: str, redundant: int, batch: int, steps: int, kill: tuple,
          policy: str, timeout: float) -> dict:
    ep = ElasticEP(timeout=timeout)
    ep.store.set(f"example/pid/{ep.member}", str(os.getpid()))
    load = torch.load(os.path.join(ckpt, "expert_load.pt"), weights_only=True)
    physical = CONFIG.num_experts + redundant
    contiguous = Placement.identity(CONFIG.num_experts, world)
    placement = rebalance(load, physical, world) if redundant else contiguous
    requests = batch * world
    capacity = requests  # decode tokens per rank per step: enough for any number of survivors

    def build(gen, placement):
        hint = flexep.Buffer.get_low_latency_rdma_size_hint(capacity, CONFIG.hidden, gen.world,
                                                            placement.num_physical)
        buffer = flexep.Buffer(gen.group, num_rdma_bytes=hint, low_latency_mode=True, **gen.buffer_kwargs())
        # Slot-wise combine: every token is bitwise the same at every EP size and placement.
        return TinyMoEModel(buffer, placement, seed=1, num_max_dispatch_tokens_per_rank=capacity,
                            slotwise_combine=True)

    moe = ElasticMoE(ep, build, placement, load=load, checkpoint=ckpt, policy=policy)
    if kill[2] == "stop":  # the new generation's rank 0 wakes the frozen rank (--fault stop)
        ep.on_change(lambda gen: gen.rank == 0 and kill[0] not in gen.members
                     and ep.store.add("example/woken", 1) == 1 and _wake(ep.store, kill[0]))
    ep.join()
    moe.module.eval()
    front = TokenStreams(ep.store, requests, steps, CONFIG.hidden)
    cache, stats = {}, dict(times=[], worst=0.0)
    with torch.inference_mode():
        # Held-out loss through the normal (prefill) path on one global batch of 256 tokens, each
        # rank its shard: the training run's level, and the same at every EP size.
        x, y = (t.chunk(world)[rank] for t in teacher_batch(10_000, 0, 256))
        loss = ((moe(x, low_latency=False) - y) ** 2).sum() / (256 * CONFIG.hidden)
        dist.all_reduce(loss)
        step, left = 0, 1
        while left:
            if (ep.member, step) == kill[:2]:
                ep.store.set("example/kill_time", repr(time.time()))
                os.kill(os.getpid(), signal.SIGSTOP if kill[2] == "stop" else signal.SIGKILL)
            try:
                left = ep.run(lambda: decode_step(ep, moe, front, cache, requests, stats))
                ep.run(ep.admit)  # replacements, or ranks that were excluded and came back
            except StaleGenerationError:  # this rank was stopped while the others went on
                if not ep.rejoin(timeout=600, cancel=front.done):
                    break
                ep.store.set(f"example/pid/{ep.member}", str(os.getpid()))
            step += 1
    ep.leave()
    if ep.is_member and ep.rank == 0:
        _fence(ep, world)
    tokens = front.tokens()
    times = sorted(stats["times"]) or [0.0]
    return dict(loss=float(loss), ms=1e3 * times[len(times) // 2], member=ep.member,
                worst=stats["worst"], replicas=placement.replica_counts.tolist(),
                rank_load=_imbalance(load, placement), contiguous_load=_imbalance(load, contiguous),
                tokens=tokens, completed=int((~tokens.isnan().any(-1).any(-1)).sum()),
                changes=[c.__dict__ for c in ep.history], is_member=ep.is_member,
                kill_time=float(ep.store.get("example/kill_time")) if ep.store.check(["example/kill_time"])
                else 0.0)


def _wake(store, member: int) -> None:
    os.kill(int(store.get(f"example/pid/{member}")), signal.SIGCONT)


def _fence(ep: ElasticEP, world: int) -> None:
    """SIGKILL the launch's processes that were excluded and are still there (e.g. stopped for
    good): the job is done, and a local launcher would otherwise wait for them."""
    def pid(member: int) -> int:
        key = f"example/pid/{member}"
        return int(ep.store.get(key)) if ep.store.check([key]) else -1

    members = {pid(m) for m in ep.members}  # a rank that rejoined is a member under a new id
    for gone in {pid(m) for m in range(world) if m not in ep.members} - members - {-1}:
        try:
            os.kill(gone, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _imbalance(load: torch.Tensor, placement: Placement) -> float:
    per_rank = rank_loads(load, placement)
    return float(per_rank.max() / per_rank.mean())


def _report(args, res: list, reference: list) -> None:
    res = [r for r in res if isinstance(r, dict) and r["is_member"]]
    r0 = max(res, key=lambda r: len(r["changes"]))  # a rank that saw every membership change
    requests = args.batch * args.ranks
    print(f"loaded {args.ckpt} at EP={args.ranks} with {args.redundant} redundant experts; "
          f"replicas per expert {r0['replicas']}")
    print(f"expected max/mean rank load from training stats: {r0['contiguous_load']:.3f} contiguous -> "
          f"{r0['rank_load']:.3f} EPLB")
    print(f"held-out loss (normal mode): {r0['loss']:.5f}")
    print(f"decode: {requests} requests x {args.steps} tokens, low-latency mode, median step "
          + ", ".join(f"rank {r['member']} {r['ms']:.2f} ms" for r in res))
    worst = max(r["worst"] for r in res)
    print(f"max |low-latency - normal| over all steps: {worst:.2e}")
    if reference:
        if not r0["changes"]:
            print(f"rank {args.kill_rank} was not killed: the run ended before step {args.at_step}")
        for c in r0["changes"]:
            total = c["agree_s"] + c["form_s"] + c["restore_s"]
            if c["kind"] == "admission":
                print(f"member(s) {list(c['joined'])} (re)joined: admitted and experts re-balanced in "
                      f"{total:.3f} s, EP -> {c['world']}")
                continue
            what = "frozen" if args.fault == "stop" else "killed"
            print(f"rank {args.kill_rank} {what} at step {args.at_step}: detected after "
                  f"{c['detected_at'] - r0['kill_time']:.2f} s, recovered in {total:.3f} s "
                  f"(agree {c['agree_s']:.3f} s, new group {c['form_s']:.3f} s, experts restored "
                  f"{c['restore_s']:.3f} s), EP {args.ranks} -> {c['world']}, policy {args.policy}")
        ref = reference[0]["tokens"]
        same = (r0["tokens"] == ref).all(-1).sum()
        print(f"requests completed: {r0['completed']}/{requests}; tokens equal to the fault-free run: "
              f"{int(same)}/{requests * args.steps} (bitwise)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="/tmp/flexep_tiny_moe")
    parser.add_argument("--ranks", type=int, default=2, help="EP size to serve at")
    parser.add_argument("--redundant", type=int, default=2, help="extra expert replicas (EPLB)")
    parser.add_argument("--batch", type=int, default=4, help="requests per rank")
    parser.add_argument("--steps", type=int, default=16, help="decode steps (tokens per request)")
    parser.add_argument("--kill-rank", type=int, default=None, help="SIGKILL this rank ...")
    parser.add_argument("--at-step", type=int, default=None, help="... at the start of this decode step")
    parser.add_argument("--fault", default="kill", choices=("kill", "stop"),
                        help="SIGKILL the rank, or freeze it (SIGSTOP; woken once it is excluded)")
    parser.add_argument("--policy", default="rerun", choices=POLICIES,
                        help="what lost experts become (docs/elastic.md)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a silent rank is lost")
    args = parser.parse_args()
    if (CONFIG.num_experts + args.redundant) % args.ranks:
        parser.error(f"experts + redundant ({CONFIG.num_experts} + {args.redundant}) must be "
                     f"divisible by --ranks ({args.ranks})")
    if (args.kill_rank is None) != (args.at_step is None):
        parser.error("--kill-rank and --at-step go together")
    start = time.perf_counter()
    common = (args.ckpt, args.redundant, args.batch, args.steps)
    reference = []
    if args.kill_rank is not None:
        reference = run_local(serve, args.ranks, (*common, (-1, -1, ""), args.policy, args.timeout),
                              timeout=300)
    kill = (args.kill_rank, args.at_step, args.fault) if args.kill_rank is not None else (-1, -1, "")
    # allow_failures: a lost rank leaves no result; the survivors' results hold every token.
    res = run_local(serve, args.ranks, (*common, kill, args.policy, args.timeout), timeout=300,
                    allow_failures=True)
    if not any(isinstance(r, dict) and r["is_member"] for r in res):
        raise SystemExit("\n".join(str(r) for r in res))
    _report(args, res, reference)
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
