"""flexep.moe.slots: the served (row, slot) pairs and their per-row sum, against plain loops."""

import pytest
import torch

from flexep.moe.slots import local_slots, served_rows, sum_slots_per_row, weighted_rows

pytestmark = pytest.mark.unit


def test_local_slots_worked_example():
    served = local_slots(torch.tensor([[1, -1], [0, 1]]), 2)
    assert served.pos.tolist() == [2, 0, 3]
    assert served.rows.tolist() == [1, 0, 1] and served.slots.tolist() == [0, 0, 1]
    assert served.counts.tolist() == [1, 2]


@pytest.mark.parametrize("seed", range(4))
def test_pairs_grouped_by_expert_in_row_order_and_sum_in_slot_order(seed):
    gen = torch.Generator().manual_seed(seed)
    m, k, local, h = (37, 4, 3, 16) if seed % 2 else (300, 8, 5, 7168)
    recv_idx = torch.randint(-1, local, (m, k), generator=gen)
    served = local_slots(recv_idx, local)
    expected = [(r, s) for e in range(local) for r in range(m) for s in range(k) if recv_idx[r, s] == e]
    assert list(zip(served.rows.tolist(), served.slots.tolist())) == expected
    assert served.counts.tolist() == [int((recv_idx == e).sum()) for e in range(local)]
    y = torch.randn(len(expected), h, generator=gen) * 1e3
    # reference: a zero-filled [M, K, H], summed over K left to right
    per_slot = torch.zeros(m, k, h)
    for i, (r, s) in enumerate(expected):
        per_slot[r, s] = y[i]
    ref = per_slot[:, 0]
    for j in range(1, k):
        ref = ref + per_slot[:, j]
    assert torch.equal(sum_slots_per_row(y, served, m), ref)


def test_served_rows_are_each_pairs_row_and_weight_with_gradients():
    gen = torch.Generator().manual_seed(7)
    m, k, local, h = 23, 4, 3, 5
    recv_idx = torch.randint(-1, local, (m, k), generator=gen)
    served = local_slots(recv_idx, local)
    recv_x = torch.randn(m, h, generator=gen, requires_grad=True)
    recv_w = torch.rand(m, k, generator=gen, requires_grad=True)
    rows, weights = served_rows(recv_x, recv_w, served)
    pairs = list(zip(served.rows.tolist(), served.slots.tolist()))
    assert torch.equal(rows, torch.stack([recv_x[r] for r, _ in pairs]))
    assert torch.equal(weights, torch.stack([recv_w[r, s] for r, s in pairs]))
    (rows * weights.unsqueeze(1)).sum().backward()
    grad_w = torch.zeros(m, k)
    grad_x = torch.zeros(m, h)
    for (r, s), row in zip(pairs, rows.detach()):
        grad_w[r, s] += row.sum()
        grad_x[r] += recv_w.detach()[r, s]
    assert torch.allclose(recv_w.grad, grad_w) and torch.allclose(recv_x.grad, grad_x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weighted_rows_same_bits_with_and_without_gradients(dtype):
    gen = torch.Generator().manual_seed(1)
    out = torch.randn(9, 6, generator=gen).to(dtype)
    weights = torch.rand(9, generator=gen)
    ref = out.double() * weights.double().unsqueeze(1)  # exact: the products of floats fit a double
    kept = out.clone()
    with torch.no_grad():
        y = weighted_rows(out, weights)
    assert y.dtype == torch.float32 and torch.equal(y, ref.float())
    assert torch.equal(out, kept)  # a float32 input is not overwritten
    w = weights.clone().requires_grad_()
    y2 = weighted_rows(out, w)
    assert torch.equal(y2, y)
    y2.sum().backward()
    assert torch.allclose(w.grad, out.float().sum(1))
