"""Routing math against the loop-based oracle: cheapest tests first, no communication."""

from __future__ import annotations

import pytest
import torch
from inputs import routing

from flexep.algorithms.packing import send_order
from flexep.layout import aligned_expert_counts, compute_layout, to_local_expert_ids
from flexep.reference import ref_layout


@pytest.mark.parametrize("num_ranks,num_experts,num_topk", [(1, 4, 1), (2, 8, 2), (4, 16, 4),
                                                            (4, 256, 8), (8, 64, 8), (3, 9, 3)])
@pytest.mark.parametrize("pattern", ["random", "holes", "one_rank", "none"])
def test_layout_matches_reference(num_ranks, num_experts, num_topk, pattern):
    gen = torch.Generator().manual_seed(num_ranks * 1000 + num_experts + num_topk)
    topk = routing(gen, 37, num_experts, num_topk, pattern, num_ranks)
    got = compute_layout(topk, num_experts, num_ranks)
    ref = ref_layout(topk, num_experts, num_ranks)
    assert torch.equal(got.num_tokens_per_rank, ref.num_tokens_per_rank)
    assert torch.equal(got.num_tokens_per_expert, ref.num_tokens_per_expert)
    assert torch.equal(got.is_token_in_rank, ref.is_token_in_rank)
    assert got.num_tokens_per_node is None
    assert got.num_tokens_per_rank.dtype == got.num_tokens_per_expert.dtype == torch.int32
    assert got.is_token_in_rank.is_contiguous()


@pytest.mark.parametrize("num_ranks,ranks_per_node", [(4, 2), (4, 1), (8, 2), (16, 8)])
def test_layout_per_node_counts(num_ranks, ranks_per_node):
    gen = torch.Generator().manual_seed(num_ranks + ranks_per_node)
    topk = routing(gen, 50, 4 * num_ranks, 4, "holes")
    got = compute_layout(topk, 4 * num_ranks, num_ranks, ranks_per_node)
    ref = ref_layout(topk, 4 * num_ranks, num_ranks, ranks_per_node)
    assert torch.equal(got.num_tokens_per_node, ref.num_tokens_per_node)


def test_layout_single_node_gives_no_node_counts():
    topk = torch.tensor([[0, 1]])
    assert compute_layout(topk, 4, 2, ranks_per_node=2).num_tokens_per_node is None


def test_layout_zero_tokens():
    lay = compute_layout(torch.zeros(0, 3, dtype=torch.int64), 8, 4)
    assert lay.num_tokens_per_rank.tolist() == [0, 0, 0, 0]
    assert lay.num_tokens_per_expert.tolist() == [0] * 8
    assert lay.is_token_in_rank.shape == (0, 4)


def test_docstring_examples():
    topk = torch.tensor([[0, 1], [1, 3], [-1, -1]])
    lay = compute_layout(topk, 4, 2)
    assert lay.num_tokens_per_rank.tolist() == [2, 1]
    assert lay.num_tokens_per_expert.tolist() == [1, 2, 0, 1]
    assert lay.is_token_in_rank.int().tolist() == [[1, 0], [1, 1], [0, 0]]
    assert send_order(torch.tensor([[1, 0], [1, 1], [0, 1]], dtype=torch.bool), 4).tolist() == [0, 1, 1, 2]
    assert to_local_expert_ids(torch.tensor([[2, 0, 3, -1]]), 1, 2).tolist() == [[0, -1, 1, -1]]
    assert aligned_expert_counts([0, 1, 4, 5], 4) == [0, 4, 4, 8]


def test_send_order_is_grouped_by_rank_then_token():
    gen = torch.Generator().manual_seed(7)
    in_rank = torch.rand(40, 4, generator=gen) < 0.5
    order = send_order(in_rank, int(in_rank.sum())).tolist()
    expected = [t for r in range(4) for t in range(40) if in_rank[t, r]]
    assert order == expected
