"""Calibration: DeepEP's published tables, the fit of the profiles to them, and its cross-validation.

Only DeepEP's own tables are fitted (results of other systems are a held-out test, see
:mod:`flexep.planner.heldout`):

* ``v1_normal``: DeepEP V1 README (``docs/legacy.md`` today), normal kernels on H800 + CX7 IB:
  4096 tokens per rank, hidden 7168, top-8 of 256 experts, FP8 dispatch, BF16 combine; EP8 with
  uniform routing (``test_intranode.py``), internode with node-limited routing,
  ``min(nodes, 4)`` nodes per token (``test_internode.py``), 24 SMs.
* ``v1_low_latency``: same README, low-latency kernels on H800 + CX7: 128 tokens per rank,
  top-8, 288 experts where the EP size divides it, else 256, 10 masked slots
  (``test_low_latency.py``).
* ``v1_normal_ibrc``: the same README as first published (February 2025), internode rows
  measured with NVSHMEM's IBRC transport: one CPU proxy thread per GPU posts every RDMA write
  (``h800_ib`` with a proxy-initiated NIC, one thread). The rows that changed when IBGDA
  replaced it (EP32, EP64) and EP16, which did not. This table is what calibrates the cost of
  a proxy-posted write.
* ``v1_low_latency_rdma``: the first README's low-latency table, from before those kernels used
  NVLink inside a node: every message went through the NIC (``h800_ib`` with a scale-up domain
  of one GPU). EP8 to EP64 (the larger sizes were not re-measured).
* ``v2_normal``: DeepEP V2 README: 8192 tokens per rank, hidden 7168, top-8 of 256, FP8
  dispatch, BF16 combine, uniform routing (``tests/elastic/test_ep.py``), hybrid mode, the SM
  count of each row. "SM90 + CX7" is read as ``h100_ib``: the NVLink bytes its EP16 dispatch
  forwards in the published time exceed what H800's NVLink can carry. "SM100 + CX7" is
  ``b200_ib``. Only dispatch_impl/combine_impl are timed (not the copy epilogue).

Metrics are computed the way each test computes them (:mod:`flexep.planner.metrics`). The fit
minimises the squared log errors of the rows (the low-latency GB/s rows repeat the latency rows'
information and are reported, not fitted) plus a weak pull of every parameter toward its prior,
which keeps a parameter no table informs at its prior instead of wandering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from .fit import nelder_mead
from .hardware import Hardware
from .metrics import metric_value
from .plan import Prediction, _fabric_us, phase_loads, predict_from_loads
from .presets import get_preset
from .profile import Profile, get_profile
from .profiles.fitted import FIT
from .routing import Routing
from .workload import ModelShape

__all__ = ["PublishedRow", "PUBLISHED", "hardware_for", "TABLES", "TOLERANCE", "SOURCES", "CalibrationRow",
           "Param", "PARAMS", "calibrate", "cross_validate", "fit", "prepare", "evaluate",
           "format_calibration", "format_fit", "workload_for", "published_for", "profiles_from"]

TABLES = ("v1_normal", "v1_normal_ibrc", "v1_low_latency", "v1_low_latency_rdma", "v2_normal")
TOLERANCE = {"v1_normal": 0.15, "v1_normal_ibrc": 0.30, "v1_low_latency": 0.25,
             "v1_low_latency_rdma": 0.25, "v2_normal": 0.15}
SOURCES = {
    "v1_normal": "github.com/deepseek-ai/DeepEP docs/legacy.md @ dd758ca (V1 README), normal kernels",
    "v1_normal_ibrc": "github.com/deepseek-ai/DeepEP README.md @ ebfe47e (2025-02-25), normal kernels",
    "v1_low_latency": "github.com/deepseek-ai/DeepEP docs/legacy.md @ dd758ca (V1 README), "
                      "low-latency kernels",
    "v1_low_latency_rdma": "github.com/deepseek-ai/DeepEP README.md @ ebfe47e (2025-02-25), "
                           "low-latency kernels",
    "v2_normal": "github.com/deepseek-ai/DeepEP README.md @ dd758ca (V2), performance table",
}
_PRIOR_WEIGHT = 0.02  # pull toward the prior, per squared log deviation
# Tokens drawn per routing: ranks beyond reuse earlier ranks' draws. Changes the calibration's
# loads by under 1% against 1 << 17 and samples several times faster.
DISTINCT_TOKENS = 1 << 15


@dataclass(frozen=True)
class PublishedRow:
    """One published number: ``value`` of ``metric`` (see :mod:`~.metrics`) for ``phase`` at
    ``ep`` in ``table``, measured on hardware ``preset`` with ``sms`` SMs (0: the default)."""

    table: str
    ep: int
    phase: str
    metric: str
    value: float
    preset: str = "h800_ib"
    sms: int = 0


def hardware_for(row: PublishedRow) -> Hardware:
    """The preset of ``row``, as its table's setup used it (see the module docstring)."""
    hw = get_preset(row.preset)
    if row.table == "v1_normal_ibrc":  # NVSHMEM IBRC: one CPU proxy thread per GPU posts
        return replace(hw, nic=replace(hw.nic, initiator="proxy", proxy_threads=1))
    if row.table == "v1_low_latency_rdma":  # every message through the NIC, none over NVLink
        return replace(hw, scale_up=replace(hw.scale_up, domain_size=1))
    return hw


def _rows() -> tuple:
    out = [PublishedRow("v1_normal", 8, "dispatch", "nvl_gbs", 153),
           PublishedRow("v1_normal", 8, "combine", "nvl_gbs", 158)]
    for ep, d, c in ((16, 43, 43), (32, 58, 57), (64, 51, 50)):
        out += [PublishedRow("v1_normal", ep, "dispatch", "rdma_gbs", d),
                PublishedRow("v1_normal", ep, "combine", "rdma_gbs", c)]
    for ep, d, c in ((16, 43, 43), (32, 44, 47), (64, 46, 45)):
        out += [PublishedRow("v1_normal_ibrc", ep, "dispatch", "rdma_gbs", d),
                PublishedRow("v1_normal_ibrc", ep, "combine", "rdma_gbs", c)]
    ll = ((8, 77, 98, 114, 127), (16, 118, 63, 195, 74), (32, 155, 48, 273, 53),
          (64, 173, 43, 314, 46), (128, 192, 39, 369, 39), (256, 194, 39, 360, 40))
    rdma = ((8, 163, 46, 318, 46), (16, 173, 43, 329, 44), (32, 182, 41, 350, 41), (64, 186, 40, 353, 41))
    for table, rows in (("v1_low_latency", ll), ("v1_low_latency_rdma", rdma)):
        for ep, dl, dbw, cl, cbw in rows:
            out += [PublishedRow(table, ep, "dispatch", "latency_us", dl),
                    PublishedRow(table, ep, "dispatch", "ll_gbs", dbw),
                    PublishedRow(table, ep, "combine", "latency_us", cl),
                    PublishedRow(table, ep, "combine", "ll_gbs", cbw)]
    for preset, ep, sms, d, c, metric in (("h100_ib", 16, 12, 90, 81, "v2_so_gbs"),
                                          ("h100_ib", 32, 6, 61, 61, "v2_so_gbs"),
                                          ("b200_ib", 16, 12, 90, 91, "v2_so_gbs"),
                                          ("b200_ib", 8, 64, 726, 740, "v2_su_gbs"),
                                          ("b200_ib", 8, 24, 643, 675, "v2_su_gbs")):
        out += [PublishedRow("v2_normal", ep, "dispatch", metric, d, preset, sms),
                PublishedRow("v2_normal", ep, "combine", metric, c, preset, sms)]
    return tuple(out)


PUBLISHED = _rows()


def workload_for(row: PublishedRow) -> tuple[ModelShape, Routing, str, str]:
    """(shape, routing, mode, profile name) DeepEP's test ran for ``row``."""
    if row.table in ("v1_normal", "v1_normal_ibrc"):
        routing = Routing("uniform") if row.ep <= 8 else Routing("group_limited")
        return ModelShape(), routing, "hierarchical", "deepep_v1"
    if row.table in ("v1_low_latency", "v1_low_latency_rdma"):
        experts = 288 if 288 % row.ep == 0 else 256
        return (ModelShape(tokens_per_rank=128, num_experts=experts),
                Routing("uniform", masked_slots=10), "low_latency", "deepep_v1")
    if row.table == "v2_normal":
        return ModelShape(tokens_per_rank=8192), Routing("uniform"), "hierarchical", "deepep_v2"
    raise ValueError(f"table must be one of {TABLES}, got {row.table!r}")


def published_for(shape: ModelShape) -> tuple:
    """V1 rows measured on ``shape``'s workload (tokens, hidden, top-k, dtypes), to overlay on a
    plan's plot of the h800_ib preset; experts may differ (DeepEP's low-latency test used 288)."""
    def key(s: ModelShape) -> tuple:
        return s.tokens_per_rank, s.hidden, s.topk, s.dispatch_dtype, s.combine_dtype
    return tuple(r for r in PUBLISHED if r.table in ("v1_normal", "v1_low_latency")
                 and key(workload_for(r)[0]) == key(shape))


@dataclass(frozen=True)
class Param:
    """One fitted constant: ``FIT[scope][name]``, its prior and bounds (fitted in log space)."""

    scope: str
    name: str
    prior: float
    lo: float
    hi: float


PARAMS = (
    Param("shared", "scaleup_efficiency", 0.75, 0.2, 1.0),
    Param("shared", "rdma_efficiency", 0.9, 0.4, 1.0),
    Param("shared", "sm_copy_gbs", 25.0, 2.0, 200.0),
    Param("shared", "proxy_message_us", 1.0, 0.01, 50.0),
    Param("deepep_v1", "sm_forward_gbs", 20.0, 2.0, 200.0),
    Param("deepep_v1", "launch_us", 20.0, 1.0, 300.0),
    Param("deepep_v1", "peer_us", 1.0, 0.01, 100.0),
    Param("deepep_v1", "ll_launch_us", 20.0, 1.0, 300.0),
    Param("deepep_v1", "ll_message_us", 0.01, 1e-4, 1.0),
    Param("deepep_v1", "ll_token_us", 0.02, 1e-4, 2.0),
    Param("deepep_v2", "launch_us", 20.0, 1.0, 300.0),
)


def profiles_from(fitted: dict) -> dict:
    """``{name: Profile}`` of the DeepEP profiles with the constants of ``fitted`` (FIT's layout)."""
    v1 = get_profile("deepep_v1").with_fit({**fitted["shared"], **fitted["deepep_v1"]})
    v2 = get_profile("deepep_v2").with_fit({**fitted["shared"], **fitted["deepep_v1"],
                                            "sm_forward_gbs": fitted["shared"]["sm_copy_gbs"],
                                            **fitted["deepep_v2"]})
    return {"deepep_v1": v1, "deepep_v2": v2}


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


@dataclass(frozen=True)
class _Case:
    """A published row with everything the model needs except the profile (sampled once)."""

    row: PublishedRow
    shape: ModelShape
    profile: str
    hw: object
    loads: object
    fabric_us: float
    channels: int


def prepare(rows: Sequence[PublishedRow] = PUBLISHED, seed: int = 0) -> list:
    """Sample every row's routing and count its loads once (the slow part of a calibration)."""
    cache: dict = {}
    out = []
    for row in rows:
        shape, routing, mode, prof_name = workload_for(row)
        hw = hardware_for(row)
        key = (row.preset, hw.domain_size, row.ep, shape, routing.describe(), mode)
        if key not in cache:
            cache[key] = phase_loads(hw, shape, routing, row.ep, (mode,), seed=seed,
                                     distinct_tokens=DISTINCT_TOKENS)
        ld = cache[key][mode, row.phase]
        prof = get_profile(prof_name)
        channels = prof.qps_per_peer
        out.append(_Case(row, shape, prof_name, hw, ld,
                         _fabric_us(ld, hw, row.ep, channels, seed, 32, mode in prof.balanced_modes),
                         channels))
    return out


def evaluate(cases: Sequence, fitted: Optional[dict] = None, explain: bool = True) -> list[CalibrationRow]:
    """Predict every prepared case with the constants ``fitted`` (default: the shipped ones);
    ``explain=False``: without the predictions' ``why`` and ``shares`` (for fitting)."""
    profs = profiles_from(fitted or FIT)
    out = []
    for c in cases:
        prof: Profile = profs[c.profile]
        p = predict_from_loads(c.loads, c.hw, prof, c.shape, c.channels, c.fabric_us, c.row.sms or None,
                               explain)
        out.append(CalibrationRow(c.row, metric_value(p, c.row.metric, c.shape), p))
    return out


def _unpack(x: Sequence[float], base: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for p, v in zip(PARAMS, x):
        out[p.scope][p.name] = min(p.hi, max(p.lo, math.exp(v)))
    return out


def fit(cases: Sequence, max_evals: int = 3000, restarts: int = 2, sweeps: int = 2) -> tuple[dict, float]:
    """Fit :data:`PARAMS` to the prepared ``cases``; returns (constants in FIT's layout, loss).

    Loss: mean squared log error of the fitted rows plus the prior pull. Starts from the
    priors, sweeps each parameter over its range ``sweeps`` times, then runs Nelder-Mead; each restart
    continues from the best point with a fresh simplex.
    """
    fitted_rows = [c for c in cases if c.row.metric != "ll_gbs"]
    base = {k: dict(v) for k, v in FIT.items()}

    def loss(x: list) -> float:
        vals = _unpack(x, base)
        rows = evaluate(fitted_rows, vals, explain=False)
        err = sum(math.log(r.predicted / r.published.value) ** 2 for r in rows) / max(len(rows), 1)
        prior = sum((xi - math.log(p.prior)) ** 2 for xi, p in zip(x, PARAMS))
        return err + _PRIOR_WEIGHT * prior / len(PARAMS)

    x = [math.log(p.prior) for p in PARAMS]
    # A term that binds nowhere at the start leaves the loss flat in its parameter, where a
    # simplex cannot see a way down: sweep every parameter over its range first.
    for _ in range(sweeps):
        for i, p in enumerate(PARAMS):
            grid = [math.log(p.lo) + (math.log(p.hi) - math.log(p.lo)) * k / 48 for k in range(49)]
            x[i] = min(grid + [x[i]], key=lambda v: loss(x[:i] + [v] + x[i + 1:]))
    best = loss(x)
    for i in range(restarts + 1):
        x, best = nelder_mead(loss, x, step=0.4 / (i + 1), max_evals=max_evals)
    return _unpack(x, base), best


def cross_validate(cases: Sequence, max_evals: int = 2000) -> dict:
    """Leave-one-table-out: for each table, fit on the others (one sweep, one restart: the fits
    start near the full fit's optimum) and predict it. Returns ``{table: [CalibrationRow]}``."""
    out = {}
    for table in TABLES:
        train = [c for c in cases if c.row.table != table]
        test = [c for c in cases if c.row.table == table]
        if not test:
            continue
        vals, _ = fit(train, max_evals=max_evals, restarts=1, sweeps=1)
        out[table] = evaluate(test, vals)
    return out


def calibrate(seed: int = 0) -> list[CalibrationRow]:
    """Every published row predicted with the shipped constants."""
    return evaluate(prepare(PUBLISHED, seed))


def _summary(rows: Sequence[CalibrationRow], table: str) -> tuple:
    errs = [abs(r.rel_error) for r in rows if r.published.table == table]
    if not errs:
        return None
    errs.sort()
    return max(errs), sum(errs) / len(errs), errs[len(errs) // 2]


def format_calibration(rows: Sequence[CalibrationRow], cv: Optional[dict] = None) -> str:
    """The calibration as a text table (fit error per row, and the leave-one-table-out error
    when ``cv`` is given), with the worst and mean error per table."""
    cvmap = {}
    for lst in (cv or {}).values():
        for r in lst:
            cvmap[r.published] = r.rel_error
    head = (f"{'table':<20}{'preset':<9}{'EP':>4}{'SMs':>4}  {'phase':<9}{'metric':<11}{'published':>10}"
            f"{'predicted':>10}{'fit err':>8}{'cv err':>8}  why")
    lines = ["Calibration against DeepEP's published tables (fit: shipped constants; cv: fitted "
             "without the row's table)", head, "-" * len(head)]
    for r in rows:
        p = r.published
        cve = f"{cvmap[p] * 100:>+7.1f}%" if p in cvmap else f"{'':>8}"
        lines.append(f"{p.table:<20}{p.preset[:8]:<9}{p.ep:>4}{r.prediction.sms or '':>4}  {p.phase:<9}"
                     f"{p.metric:<11}{p.value:>10.1f}{r.predicted:>10.1f}{r.rel_error * 100:>+7.1f}%{cve}"
                     f"  {r.prediction.why}")
    for table in TABLES:
        s = _summary(rows, table)
        if s is None:
            continue
        line = (f"{table}: fit worst |error| {s[0] * 100:.1f}% (target {TOLERANCE[table] * 100:.0f}%), "
                f"mean {s[1] * 100:.1f}%")
        if cv and table in cv:
            c = _summary(cv[table], table)
            line += f"; leave-one-table-out worst {c[0] * 100:.1f}%, mean {c[1] * 100:.1f}%"
        lines.append(line)
    return "\n".join(lines)


def format_fit(fitted: dict) -> str:
    """``fitted`` as the source of :mod:`flexep.planner.profiles.fitted`."""
    body = ",\n".join(f"    {scope!r}: {{" + ", ".join(f"{k!r}: {v:.4g}" for k, v in vals.items()) + "}"
                      for scope, vals in fitted.items())
    return "FIT = {\n" + body + ",\n}\n"
