"""Held-out test: other systems' published results, predicted with the shipped constants.

Nothing here is fitted: the rows of :mod:`flexep.planner.heldout_data` are predicted with the
hardware presets (datasheet numbers) and the profiles as calibrated on DeepEP's tables, and the
errors are only reported (``flexep plan --heldout``, ``tests/test_planner_heldout.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

from .calibration import DISTINCT_TOKENS
from .heldout_data import SOURCES
from .metrics import metric_value
from .plan import Prediction, _fabric_us, phase_loads, predict_from_loads
from .presets import get_preset
from .profile import get_profile
from .routing import Routing
from .workload import ModelShape

__all__ = ["HeldOutRow", "heldout_rows", "summarize", "format_heldout"]


@dataclass(frozen=True)
class HeldOutRow:
    """One published row of another system, its prediction and the relative error."""

    source: str
    ep: int
    phase: str
    metric: str
    published: float
    predicted: float
    prediction: Prediction

    @property
    def rel_error(self) -> float:
        return self.predicted / self.published - 1


def heldout_rows(sources: Sequence[dict] = SOURCES, seed: int = 0,
                 keys: Optional[Sequence[str]] = None) -> list[HeldOutRow]:
    """Predict every row of ``sources`` (optionally only the sources named in ``keys``)."""
    out = []
    for src in sources:
        if keys is not None and src["key"] not in keys:
            continue
        hw, prof = get_preset(src["preset"]), get_profile(src["profile"])
        base = ModelShape(**src["shape"])
        routing = Routing(src["routing"], masked_slots=src.get("masked_slots", 0))
        capacity = base.tokens_per_rank if prof.ll_capacity else 0
        loads: dict = {}
        for ep, phase, metric, value in src["rows"]:
            # As DeepEP's tests: 256 experts where the source's count does not divide the EP size.
            shape = base if base.num_experts % ep == 0 else replace(base, num_experts=256)
            if ep not in loads:
                loads[ep] = phase_loads(hw, shape, routing, ep, (src["mode"],), capacity, seed,
                                        distinct_tokens=DISTINCT_TOKENS)
            ld = loads[ep][src["mode"], phase]
            fab = _fabric_us(ld, hw, ep, prof.qps_per_peer, seed, 32, src["mode"] in prof.balanced_modes)
            p = predict_from_loads(ld, hw, prof, shape, prof.qps_per_peer, fab, src.get("sms") or None)
            out.append(HeldOutRow(src["key"], ep, phase, metric, float(value),
                                  metric_value(p, metric, shape), p))
    return out


def summarize(rows: Sequence[HeldOutRow]) -> dict:
    """``{"n", "median", "worst", "within_15", "within_25"}`` of the absolute relative errors."""
    errs = sorted(abs(r.rel_error) for r in rows)
    if not errs:
        return {"n": 0, "median": 0.0, "worst": 0.0, "within_15": 0, "within_25": 0}
    mid = len(errs) // 2
    median = errs[mid] if len(errs) % 2 else (errs[mid - 1] + errs[mid]) / 2
    return {"n": len(errs), "median": median, "worst": errs[-1],
            "within_15": sum(e <= 0.15 for e in errs), "within_25": sum(e <= 0.25 for e in errs)}


def format_heldout(rows: Sequence[HeldOutRow]) -> str:
    """Rows, a summary per source and overall."""
    head = (f"{'source':<20}{'EP':>4}  {'phase':<9}{'metric':<11}{'published':>10}{'predicted':>10}"
            f"{'error':>8}  why")
    lines = ["Held-out: other systems' published results, predicted with the shipped constants "
             "(never fitted)", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.source:<20}{r.ep:>4}  {r.phase:<9}{r.metric:<11}{r.published:>10.1f}"
                     f"{r.predicted:>10.1f}{r.rel_error * 100:>+7.1f}%  {r.prediction.why}")
    lines.append("")
    for key in dict.fromkeys(r.source for r in rows):
        s = summarize([r for r in rows if r.source == key])
        lines.append(f"{key:<20} n={s['n']:<3} median |error| {s['median'] * 100:5.1f}%  "
                     f"worst {s['worst'] * 100:5.1f}%  within 15%: {s['within_15']}")
    s = summarize(rows)
    lines.append(f"{'all':<20} n={s['n']:<3} median |error| {s['median'] * 100:5.1f}%  "
                 f"worst {s['worst'] * 100:5.1f}%  within 15%: {s['within_15']}, "
                 f"within 25%: {s['within_25']}")
    return "\n".join(lines)
