"""Calibration: DeepEP's published V1 tables next to the planner's predictions.

The tables (DeepEP README, V1; ``../shared/reference/deepep-v1-api.md`` section 9) were
measured on H800 + NVLink + CX7 400 Gb/s InfiniBand. Each row is predicted with the ``h800_ib``
preset (one parameter set for every row) on the workload DeepEP's test used for it:

* normal: 4096 tokens per rank, hidden 7168, top-8 of 256 experts, FP8 dispatch, BF16
  combine; intranode EP8 with uniform routing (``test_intranode.py``), internode with
  node-limited routing, ``min(num_nodes, 4)`` nodes per token (``test_internode.py``); timed as
  the hierarchical mode (DeepEP's internode kernels forward over NVLink).
* low latency: 128 tokens per rank, hidden 7168, top-8, 10 masked slots per rank
  (``test_low_latency.py``), 288 experts where the EP size divides it, else 256 (DeepSeek-V3's
  routed experts).

Metrics are computed the way DeepEP's tests compute them: intranode "NVL GB/s" = received
tokens x hidden x 2 / t, internode "RDMA GB/s" = (token, destination node) pairs including the
local node x hidden x 2 / t, both times ``(1 + 4/128) / 2`` for an FP8 dispatch; low-latency
GB/s = valid selections x message bytes / t (DeepEP's bytes per selection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .hardware import Hardware
from .plan import Prediction, predict
from .presets import get_preset
from .routing import Routing
from .workload import ModelShape

__all__ = ["PublishedRow", "PUBLISHED", "TOLERANCE", "CalibrationRow", "calibrate",
           "format_calibration", "workload_for", "published_for"]

TOLERANCE = {"normal": 0.15, "low_latency": 0.25}


@dataclass(frozen=True)
class PublishedRow:
    """One published number: ``value`` of ``metric`` (``"nvl_gbs"``, ``"rdma_gbs"``,
    ``"latency_us"``, ``"ll_gbs"``) for ``phase`` at ``ep`` in ``table``."""

    table: str  # "normal" or "low_latency"
    ep: int
    phase: str
    metric: str
    value: float


def _rows() -> tuple:
    out = [PublishedRow("normal", 8, "dispatch", "nvl_gbs", 153),
           PublishedRow("normal", 8, "combine", "nvl_gbs", 158)]
    for ep, d, c in ((16, 43, 43), (32, 58, 57), (64, 51, 50)):
        out += [PublishedRow("normal", ep, "dispatch", "rdma_gbs", d),
                PublishedRow("normal", ep, "combine", "rdma_gbs", c)]
    ll = ((8, 77, 98, 114, 127), (16, 118, 63, 195, 74), (32, 155, 48, 273, 53),
          (64, 173, 43, 314, 46), (128, 192, 39, 369, 39), (256, 194, 39, 360, 40))
    for ep, dl, dbw, cl, cbw in ll:
        out += [PublishedRow("low_latency", ep, "dispatch", "latency_us", dl),
                PublishedRow("low_latency", ep, "dispatch", "ll_gbs", dbw),
                PublishedRow("low_latency", ep, "combine", "latency_us", cl),
                PublishedRow("low_latency", ep, "combine", "ll_gbs", cbw)]
    return tuple(out)


PUBLISHED = _rows()


def workload_for(table: str, ep: int) -> tuple[ModelShape, Routing, str]:
    """(shape, routing, mode) DeepEP's test ran for a row of ``table`` at ``ep``."""
    if table == "normal":
        routing = Routing("uniform") if ep <= 8 else Routing("group_limited")
        return ModelShape(), routing, "hierarchical"
    if table == "low_latency":
        experts = 288 if 288 % ep == 0 else 256
        return (ModelShape(tokens_per_rank=128, num_experts=experts),
                Routing("uniform", masked_slots=10), "low_latency")
    raise ValueError(f"table must be 'normal' or 'low_latency', got {table!r}")


def published_for(shape: ModelShape) -> tuple:
    """Published rows measured on ``shape``'s workload (tokens, hidden, top-k, dtypes), to
    overlay on a plan's plot; experts may differ (DeepEP's low-latency test used 288)."""
    def key(s: ModelShape) -> tuple:
        return s.tokens_per_rank, s.hidden, s.topk, s.dispatch_dtype, s.combine_dtype
    return tuple(r for r in PUBLISHED if key(workload_for(r.table, r.ep)[0]) == key(shape))


@dataclass(frozen=True)
class CalibrationRow:
    """A published row, the prediction for it and the relative error ``predicted / published - 1``."""

    published: PublishedRow
    predicted: float
    prediction: Prediction

    @property
    def rel_error(self) -> float:
        return self.predicted / self.published.value - 1

    @property
    def within_target(self) -> bool:
        return abs(self.rel_error) <= TOLERANCE[self.published.table]


def _metric(p: Prediction, metric: str) -> float:
    if metric == "latency_us":
        return p.time_us
    return p.bandwidth_gbs["nvl" if metric == "nvl_gbs" else "rdma"]


def calibrate(hw: Optional[Hardware] = None, seed: int = 0) -> list[CalibrationRow]:
    """Predict every row of :data:`PUBLISHED` with ``hw`` (default: the ``h800_ib`` preset)."""
    hw = hw or get_preset("h800_ib")
    cache: dict = {}
    out = []
    for row in PUBLISHED:
        key = (row.table, row.ep)
        if key not in cache:
            shape, routing, mode = workload_for(row.table, row.ep)
            preds = predict(hw, shape, routing, row.ep, modes=(mode,), seed=seed)
            cache[key] = {p.phase: p for p in preds}
        p = cache[key][row.phase]
        out.append(CalibrationRow(row, _metric(p, row.metric), p))
    return out


def format_calibration(rows: list[CalibrationRow], hw_name: str = "h800_ib") -> str:
    """The calibration as a text table, with the worst error per table and its target."""
    head = f"{'table':<12}{'EP':>4}  {'phase':<9}{'metric':<11}{'published':>10}{'predicted':>10}" \
           f"{'error':>8}  bottleneck"
    lines = [f"Calibration of preset {hw_name} against DeepEP's published V1 tables", head,
             "-" * len(head)]
    for r in rows:
        p = r.published
        lines.append(f"{p.table:<12}{p.ep:>4}  {p.phase:<9}{p.metric:<11}{p.value:>10.1f}"
                     f"{r.predicted:>10.1f}{r.rel_error * 100:>+7.1f}%  {r.prediction.bottleneck}")
    for table, tol in TOLERANCE.items():
        errs = [abs(r.rel_error) for r in rows if r.published.table == table]
        if errs:
            lines.append(f"{table}: worst |error| {max(errs) * 100:.1f}% (target {tol * 100:.0f}%), "
                         f"mean {sum(errs) / len(errs) * 100:.1f}%")
    return "\n".join(lines)
