"""Correctness across real network namespaces (run by ``.ci/netbed`` under ``netbed torchrun``).

Every rank builds every rank's inputs from fixed seeds, so it can run the single-process oracle
(:mod:`flexep.reference`) for the whole world and compare its own outputs with it. Checked for
the hierarchical algorithm with 1 channel and with the Buffer's default (which must choose 4
channels here: each node is a network namespace of its own), and the flat one with 4 channels: received rows
(bit for bit), their top-k ids and weights, tokens per expert, and combine's sums; the
hierarchical results must also equal the flat ones bit for bit. Any mismatch raises, so the
rank, its torchrun and ``netbed torchrun`` exit non-zero.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import flexep
from flexep.reference import ref_combine, ref_dispatch

HIDDEN, EXPERTS, TOKENS = 256, 32, 24


def inputs(case: str, rank: int) -> tuple:
    """``(x [T, H], topk_idx [T, K], topk_weights [T, K])`` of ``rank`` for ``case``."""
    gen = torch.Generator().manual_seed(1000 * rank + len(case))
    dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
    x = torch.randn(TOKENS, HIDDEN, generator=gen).to(dtype)
    k = 8 if case.startswith("random") else 4
    scores = torch.rand(TOKENS, EXPERTS, generator=gen)
    if case.startswith("node0"):  # every token to the first node's experts only
        scores[:, EXPERTS // 2:] = -1.0
    idx = scores.topk(k, dim=1).indices
    idx[torch.rand(TOKENS, k, generator=gen) < 0.1] = -1  # holes
    w = torch.rand(TOKENS, k, generator=gen).masked_fill(idx < 0, 0.0)
    return x, idx, w


def check(name: str, got, want, exact: bool = True) -> None:
    ok = torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    if not ok:
        raise AssertionError(f"rank {dist.get_rank()}: {name} differs from the oracle")


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rpn = int(os.environ["LOCAL_WORLD_SIZE"])
    group = dist.group.WORLD
    buffers = {"hier c1": flexep.Buffer(group, ranks_per_node=rpn, num_channels=1, explicitly_destroy=True),
               "hier default": flexep.Buffer(group, explicitly_destroy=True),
               "flat c4": flexep.Buffer(group, ranks_per_node=rpn, hierarchical=False, num_channels=4,
                                          explicitly_destroy=True)}
    default = buffers["hier default"]
    if world > rpn and not default.hierarchical:
        raise AssertionError("several nodes but the default Buffer is not hierarchical")
    # Each node is its own network namespace: the default takes FLOWS_PER_PATH (4) connections
    # per path between two nodes over FLEXEP_NET_PATHS (default 2) paths, P per channel.
    paths = int(os.environ.get("FLEXEP_NET_PATHS", "2"))
    want_channels = min(8, -(-4 * paths // rpn))
    if default.num_channels != want_channels:
        raise AssertionError(f"default Buffer chose {default.num_channels} channels across namespaces, "
                             f"expected {want_channels} ({rpn} ranks per node, {paths} paths)")
    for case in ("random_fp32", "random_bf16", "node0_fp32"):
        every = [inputs(case, r) for r in range(world)]
        ref = ref_dispatch([e[0] for e in every], [e[1] for e in every], EXPERTS, [e[2] for e in every])
        want_comb = ref_combine([d.recv_x for d in ref], ref, [TOKENS] * world)[rank][0]
        x, idx, w = every[rank]
        n = len(ref[rank].recv_src)
        seen = {}
        for key, buf in buffers.items():
            lay = buf.get_dispatch_layout(idx, EXPERTS)
            recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
                x, num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1], is_token_in_rank=lay[3],
                num_tokens_per_expert=lay[2], topk_idx=idx, topk_weights=w)
            combined, _, _ = buf.combine(recv_x, handle)
            what = f"{case} {key}"
            check(f"{what} recv_x", recv_x[:n], ref[rank].recv_x)
            check(f"{what} recv_topk_idx", recv_idx[:n], ref[rank].recv_topk_idx)
            check(f"{what} recv_topk_weights", recv_w[:n], ref[rank].recv_topk_weights)
            if counts != ref[rank].num_recv_tokens_per_expert:
                raise AssertionError(f"rank {rank}: {what} tokens per expert differ from the oracle")
            check(f"{what} combine", combined.double(), want_comb.to(x.dtype).double(),
                  exact=x.dtype != torch.float32)
            seen[key] = (recv_x[:n], combined)
        for key in ("hier c1", "hier default"):
            for a, b in zip(seen[key], seen["flat c4"]):
                check(f"{case} {key} vs flat", a, b)
    dist.barrier()
    if rank == 0:
        print(f"netbed check: hierarchical (1 channel, and the default {default.num_channels}) and flat "
              f"(4 channels) equal the oracle on {world} ranks, {world // rpn} nodes", flush=True)
    for buf in buffers.values():
        buf.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
