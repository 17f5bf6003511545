"""dispatch skips the value checks that the tensors of ``get_dispatch_layout`` pass by
construction, and only those: a layout tensor or ``topk_idx`` changed in place after the layout
call is checked again (2 Gloo ranks, against the single-process oracle)."""

import pytest
import torch
import torch.distributed as dist

import flexep
from flexep.core import checks
from flexep.launch import run_local
from flexep.reference import ref_dispatch

pytestmark = pytest.mark.ranks

T, H, E, K = 6, 32, 8, 2


def _inputs(world: int):
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(T, H, generator=g) for _ in range(world)]
    idx = [torch.rand(T, E, generator=g).topk(K, dim=1).indices for _ in range(world)]
    return xs, idx


def _outcome(fn) -> str:
    try:
        fn()
        return "ok"
    except ValueError as exc:
        return f"{type(exc).__name__}: {exc}"


def _worker(rank: int, world: int) -> dict:
    xs, idx = _inputs(world)
    buf = flexep.Buffer(dist.group.WORLD, timeout=30, explicitly_destroy=True)
    histograms = []
    real = checks.expert_histogram

    def counted(*a, **k):
        histograms.append(1)
        return real(*a, **k)

    checks.expert_histogram = counted  # the consistency check's own histogram
    out = {}

    def dispatch(topk, lay):
        ntr, _, nte, itr, _ = lay
        return buf.dispatch(xs[rank], num_tokens_per_rank=ntr, is_token_in_rank=itr,
                            num_tokens_per_expert=nte, topk_idx=topk, topk_weights=torch.ones(T, K))

    # The layout's own tensors: nothing left to check, and the result is the oracle's.
    topk = idx[rank].clone()
    lay = buf.get_dispatch_layout(topk, E)
    recv_x = dispatch(topk, lay)[0]
    out["same_tensors"] = (len(histograms), torch.equal(recv_x, ref_dispatch(xs, idx, E)[rank].recv_x))
    # Equal values in other tensors: checked.
    histograms.clear()
    dispatch(topk.clone(), tuple(t.clone() if t is not None else None for t in lay[:4]) + (None,))
    out["clones"] = len(histograms)
    # Changed in place after the layout call, on rank 0 only: checked, and every rank hears of it.
    lay = buf.get_dispatch_layout(topk, E)
    if rank == 0:
        lay[2][0] += 1
    out["counts_changed"] = _outcome(lambda: dispatch(topk, lay))
    lay = buf.get_dispatch_layout(topk, E)
    if rank == 0:
        topk[1, 1] = topk[1, 0]
    out["topk_changed"] = _outcome(lambda: dispatch(topk, lay))
    checks.expert_histogram = real
    buf.destroy()
    return out


def test_checks_skipped_only_for_the_layouts_own_unchanged_tensors():
    got = run_local(_worker, 2, timeout=120)
    for rank, out in enumerate(got):
        assert out["same_tensors"] == (0, True), out
        assert out["clones"] == 1, out
        if rank == 0:
            assert out["counts_changed"].startswith("ValueError: num_tokens_per_expert does not match"), out
            assert "selects an expert twice" in out["topk_changed"], out
        else:
            assert out["counts_changed"].startswith("RemoteInputError: rank(s) [0] rejected"), out
            assert out["topk_changed"].startswith("RemoteInputError: rank(s) [0] rejected"), out


@pytest.mark.unit
def test_stamp_never_matches_missing_or_freed_tensors():
    from types import SimpleNamespace

    idx = torch.tensor([[0, 1]])
    lay = SimpleNamespace(num_tokens_per_rank=torch.ones(2),
                          is_token_in_rank=torch.ones(1, 2, dtype=torch.bool),
                          num_tokens_per_expert=torch.ones(4))
    stamp = checks.LayoutStamp.of(idx, lay, 4, True)
    req = SimpleNamespace(topk_idx=idx, num_tokens_per_rank=lay.num_tokens_per_rank,
                          is_token_in_rank=lay.is_token_in_rank,
                          num_tokens_per_expert=lay.num_tokens_per_expert, num_experts=4)
    assert stamp.matches(req)
    assert not stamp.matches(SimpleNamespace(**{**vars(req), "num_experts": 8}))
    del lay, idx
    # the layout's tensors freed, the request passing None where they were: no match, no error
    freed = SimpleNamespace(topk_idx=None, num_tokens_per_rank=None, is_token_in_rank=req.is_token_in_rank,
                            num_tokens_per_expert=req.num_tokens_per_expert, num_experts=4)
    stamp = checks.LayoutStamp.of(torch.zeros(1, 2, dtype=torch.int64), SimpleNamespace(
        num_tokens_per_rank=torch.ones(2), is_token_in_rank=torch.ones(1, 2, dtype=torch.bool),
        num_tokens_per_expert=torch.ones(4)), 4, True)
    assert not stamp.matches(freed)


@pytest.mark.unit
def test_no_stamp_for_inference_tensors():
    """Tensors made under torch.inference_mode have no version counter: always checked."""
    from types import SimpleNamespace

    with torch.inference_mode():
        idx = torch.tensor([[0, 1]])
        lay = SimpleNamespace(num_tokens_per_rank=torch.ones(2),
                              is_token_in_rank=torch.ones(1, 2, dtype=torch.bool),
                              num_tokens_per_expert=torch.ones(4))
    assert checks.LayoutStamp.of(idx, lay, 4, True) is None
    stamp = checks.LayoutStamp.of(torch.zeros(1, 2, dtype=torch.int64), SimpleNamespace(
        num_tokens_per_rank=torch.ones(2), is_token_in_rank=torch.ones(1, 2, dtype=torch.bool),
        num_tokens_per_expert=torch.ones(4)), 4, True)
    req = SimpleNamespace(topk_idx=idx, num_tokens_per_rank=lay.num_tokens_per_rank,
                          is_token_in_rank=lay.is_token_in_rank,
                          num_tokens_per_expert=lay.num_tokens_per_expert, num_experts=4)
    assert not stamp.matches(req)
