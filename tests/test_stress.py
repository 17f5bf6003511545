"""``flexep stress`` in CI: a short randomised run must report 0 mismatches.

The soak (``flexep stress --iters 10000``) is the same code with more iterations. The oracle
checks themselves are tested too: a tampered result must be reported as a mismatch.
"""

from __future__ import annotations

import json

import pytest
import torch

from flexep import Buffer
from flexep.cli.stress import Tally, _normal_iteration, draw_case, main, rank_inputs


def _run(capsys, *argv: str) -> dict:
    code = main([*argv, "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert code == (0 if rep.get("mismatches") == 0 else 1), rep
    return rep


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_short_stress_run_normal_mode(capsys):
    rep = _run(capsys, "--iters", "200", "--no-ll")
    assert rep["mismatches"] == 0, rep["problems"]
    assert rep["iterations"] == rep["normal"] == 200
    assert rep["tokens_moved"] > 0 and rep["bytes_moved"] > 0
    assert 0 < rep["latency_ms"]["p50"] <= rep["latency_ms"]["max"]
    assert rep["growth"]["threads"] <= 2 and rep["growth"]["fds"] <= 4, rep["growth"]  # no leak (F3)


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_short_stress_run_hierarchical(capsys):
    """World 4 as 2 virtual nodes of 2: the hierarchical path under verify and the oracle."""
    rep = _run(capsys, "--iters", "60", "--world", "4", "--ranks-per-node", "2", "--no-ll")
    assert rep["path"] == "hierarchical" and rep["iterations"] == 60
    assert rep["mismatches"] == 0, rep["problems"]


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_short_stress_run_with_low_latency(capsys):
    if not hasattr(Buffer, "low_latency_dispatch"):
        pytest.skip("low-latency mode not available")
    rep = _run(capsys, "--iters", "100")
    assert "error" not in rep, rep.get("error", "")[-2000:]
    assert rep["mismatches"] == 0, rep["problems"]
    assert rep["low_latency"] > 0


def test_cases_are_shared_by_all_ranks():
    """Every rank draws the same case for an iteration, and the case covers the extremes."""
    cases = [draw_case(3, it, 2, True) for it in range(400)]
    assert cases == [draw_case(3, it, 2, True) for it in range(400)]
    assert {c.mode for c in cases} == {"normal", "ll"}
    assert {c.kind for c in cases} >= {"bf16", "fp16", "fp32", "fp8"}
    assert any(0 in c.tokens for c in cases) and any(c.holes == 1.0 for c in cases)
    assert any(c.cached for c in cases) and any(c.alignment > 1 for c in cases)
    assert any(c.incast for c in cases)


class _Tampered:
    """A Buffer whose combine adds 1 to its result: the stress oracle must notice."""

    def __init__(self, buf: Buffer) -> None:
        self._buf = buf

    def __getattr__(self, name: str):
        return getattr(self._buf, name)

    def combine(self, *args, **kwargs):
        out, weights, event = self._buf.combine(*args, **kwargs)
        return out + 1, weights, event


def test_oracle_reports_a_wrong_result(gloo_world1):
    buf = Buffer(gloo_world1, timeout=30, verify=True)
    it = next(i for i in range(100) if draw_case(0, i, 1, False).tokens[0] > 0)
    case = draw_case(0, it, 1, False)
    everyone = [rank_inputs(case, 0, it, 0)]
    assert _normal_iteration(buf, case, everyone, 0, Tally()) == []
    problems = _normal_iteration(_Tampered(buf), case, everyone, 0, Tally())
    assert problems == ["combine(dispatch(x)) != x * receiving ranks"]


def test_low_latency_fp8_with_zero_tokens(gloo_world1):
    """A rank with no tokens must still take part in an FP8 low-latency round trip."""
    hint = Buffer.get_low_latency_rdma_size_hint(8, 128, 1, 8)
    buf = Buffer(gloo_world1, num_rdma_bytes=hint, low_latency_mode=True, timeout=30)
    x = torch.zeros(0, 128, dtype=torch.bfloat16)
    idx = torch.zeros(0, 2, dtype=torch.int64)
    (recv, scales), count, handle, _, _ = buf.low_latency_dispatch(x, idx, 8, 8, use_fp8=True)
    assert count.tolist() == [0] * 8
    out, _, _ = buf.low_latency_combine(recv.float().bfloat16(), idx, torch.zeros(0, 2), handle)
    assert out.shape == (0, 128)
