"""Quick start: dispatch tokens to their experts and combine the results, on 2 local CPU ranks.

    python examples/quickstart.py

Each rank routes its tokens to 2 of 8 experts (4 per rank), dispatches them with DeepEP's
``Buffer`` API, runs stand-in experts (expert e multiplies by e + 1), weights and combines the
results back, and the parent checks everything against flexep's single-process reference.
"""

import torch
import torch.distributed as dist

import flexep
from flexep.launch import run_local
from flexep.reference import ref_dispatch

EXPERTS, TOKENS, HIDDEN, TOPK = 8, 16, 64, 2


def inputs(rank: int):
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(TOKENS, HIDDEN, generator=gen)
    topk_idx = torch.rand(TOKENS, EXPERTS, generator=gen).topk(TOPK, dim=1).indices
    topk_weights = torch.rand(TOKENS, TOPK, generator=gen)
    return x, topk_idx, topk_weights


def worker(rank: int, world: int):
    x, topk_idx, topk_weights = inputs(rank)
    buffer = flexep.Buffer(dist.group.WORLD)  # import flexep as deep_ep: the same calls
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = \
        buffer.get_dispatch_layout(topk_idx, EXPERTS)
    recv_x, recv_topk_idx, recv_topk_weights, _, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights)
    # This rank's experts, weighted per received row (recv_topk_idx is -1 for experts elsewhere).
    first = rank * EXPERTS // world
    scale = torch.where(recv_topk_idx >= 0, (first + recv_topk_idx + 1).float(), 0.0)
    y = recv_x * (recv_topk_weights * scale).sum(1, keepdim=True)
    combined_x, _, _ = buffer.combine(y, handle)  # summed over the ranks each token went to
    return recv_x, combined_x


if __name__ == "__main__":
    world = 2
    results = run_local(worker, world)
    everyone = [inputs(r) for r in range(world)]
    expected = ref_dispatch([e[0] for e in everyone], [e[1] for e in everyone], EXPERTS)
    for rank, (recv_x, combined_x) in enumerate(results):
        assert torch.equal(recv_x, expected[rank].recv_x), f"rank {rank}: dispatch differs"
        x, topk_idx, topk_weights = everyone[rank]
        want = x * (topk_weights * (topk_idx + 1).float()).sum(1, keepdim=True)
        torch.testing.assert_close(combined_x, want)
    print(f"dispatch and combine on {world} ranks match the single-process reference")
