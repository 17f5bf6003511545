"""flexep.reduce.sum_blocks against a row-by-row float accumulation (single process)."""

import itertools

import pytest
import torch

import flexep.algorithms.reduce as R
from flexep.algorithms.packing import send_order
from flexep.algorithms.reduce import sum_blocks
from flexep.comm.workspace import Workspace


def _reference(rows, index, num_tokens, bias):
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    out = torch.zeros(num_tokens, rows.size(1), dtype=acc)
    for b in bias:
        out += b.to(acc)
    for i in range(rows.size(0)):
        out[index[i]] += rows[i].to(acc)
    return out.to(rows.dtype)


def _blocks(num_tokens, num_blocks, density, gen):
    mask = torch.rand(num_tokens, num_blocks, generator=gen) < density
    return send_order(mask, int(mask.sum())), mask.sum(0).tolist()


@pytest.fixture(params=[("tiny tiles", 64, 16), ("one tile", 4 << 20, 16), ("gather fill", 64, 0)],
                ids=lambda p: p[0])
def tiling(request, monkeypatch):
    """Exercise several tiles per call, a single tile, and the gather fill of a tile."""
    _, tile_bytes, gather_blocks = request.param
    monkeypatch.setattr(R, "_TILE_BYTES", tile_bytes)
    monkeypatch.setattr(R, "_GATHER_BLOCKS", gather_blocks)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_matches_row_by_row_sum(tiling, dtype):
    gen = torch.Generator().manual_seed(0)
    ws = Workspace()
    for num_tokens, num_blocks, width, num_bias in itertools.product([0, 1, 7, 40], [1, 4],
                                                                     [0, 5, 24], [0, 1, 2]):
        index, counts = _blocks(num_tokens, num_blocks, 0.6, gen)
        rows = (torch.randn(index.numel(), width, generator=gen) * 3).to(dtype)
        bias = [torch.randn(num_tokens, width, generator=gen).to(dtype) for _ in range(num_bias)]
        want = _reference(rows, index, num_tokens, bias)
        got = sum_blocks(rows, index, counts, num_tokens, bias, ws)
        case = f"T={num_tokens} blocks={num_blocks} D={width} bias={num_bias}"
        assert got.dtype == dtype and got.shape == (num_tokens, width), case
        assert torch.equal(got, want), case
        out = torch.full((num_tokens, width), 7.0, dtype=dtype)
        assert sum_blocks(rows, index, counts, num_tokens, bias, ws, out=out) is out, case
        assert torch.equal(out, want), case


def test_ties_round_to_even(tiling):
    # x + x + x is exact in float32; rounding it to bf16 hits many exact ties, which must go to
    # even (as torch's casts and DeepEP's kernels do), so the result equals x * 3 bitwise.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=gen).to(torch.bfloat16)
    index = torch.arange(64).repeat(3)
    got = sum_blocks(x.repeat(3, 1), index, [64, 64, 64], 64)
    assert torch.equal(got, x * 3)
    assert torch.equal(got, (x.float() * 3).to(torch.bfloat16))


def test_tokens_without_rows_are_zero_and_bias_only():
    index = torch.tensor([1, 3, 3], dtype=torch.int64)
    rows = torch.ones(3, 2, dtype=torch.bfloat16)
    got = sum_blocks(rows, index, [2, 1], 5)
    assert got.tolist() == [[0, 0], [1, 1], [0, 0], [2, 2], [0, 0]]
    bias = torch.full((5, 2), 0.5, dtype=torch.bfloat16)
    got = sum_blocks(rows[:0], index[:0], [0, 0], 5, (bias,))
    assert torch.equal(got, bias)


def test_summation_order_is_block_order():
    # 1 + 2^-24 + 2^-24 in float32: block order gives 1, a different order would not.
    rows = torch.tensor([[1.0], [2.0 ** -24], [2.0 ** -24]], dtype=torch.float32)
    got = sum_blocks(rows, torch.zeros(3, dtype=torch.int64), [1, 1, 1], 1)
    assert got.item() == 1.0
    got = sum_blocks(rows.flip(0), torch.zeros(3, dtype=torch.int64), [1, 1, 1], 1)
    assert got.item() == 1.0 + 2.0 ** -23
