"""PNG plots: predictions (time and DeepEP-style bandwidth versus EP size, one line per
(preset, mode, phase), DeepEP's published points overlaid) and the calibration (predicted
against published). matplotlib is imported here only.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .calibration import PublishedRow
from .plan import Prediction

__all__ = ["plot_predictions", "plot_calibration"]

_MODE_LABEL = {"flat": "normal flat", "hierarchical": "normal hierarchical", "low_latency": "low latency"}
_COLORS = {"flat": "tab:blue", "hierarchical": "tab:orange", "low_latency": "tab:green"}


def plot_predictions(series: Sequence[tuple[str, Prediction]], path: str,
                     published: Sequence[PublishedRow] = (), title: str = "") -> str:
    """Write ``path`` (PNG). ``series``: ``(preset name, prediction)`` pairs; ``published``:
    rows drawn as markers (normal-table bandwidths, low-latency latencies and bandwidths)."""
    plt = _pyplot()
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 5.2))
    presets = sorted({name for name, _ in series})
    styles = ["-", ":", "-.", (0, (5, 1))]
    groups: dict = {}
    for name, p in series:
        groups.setdefault((name, p.mode, p.phase, p.channels), []).append(p)
    for (name, mode, phase, ch), preds in sorted(groups.items()):
        preds.sort(key=lambda p: p.ep)
        eps = [p.ep for p in preds]
        style = styles[presets.index(name) % len(styles)] if phase == "dispatch" else "--"
        marker = "o" if phase == "dispatch" else "s"
        label = f"{_MODE_LABEL[mode]} {phase}"
        if len(presets) > 1:
            label = f"{name}: {label}"
        if len({c for (_, _, _, c) in groups}) > 1:
            label += f" ({ch} ch)"
        kw = dict(color=_COLORS[mode], linestyle=style, marker=marker, markersize=4, label=label,
                  alpha=1.0 if presets.index(name) == 0 else 0.7)
        ax_t.plot(eps, [p.time_us for p in preds], **kw)
        ax_b.plot(eps, [p.deepep_gbs for p in preds], **kw)
    _overlay(ax_t, ax_b, published)
    for ax in (ax_t, ax_b):
        ax.set_xscale("log", base=2)
        eps = sorted({p.ep for _, p in series} | {r.ep for r in published})
        ax.set_xticks(eps, [str(e) for e in eps])
        ax.set_xlabel("EP size (ranks)")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("predicted time per call (us)")
    ax_b.set_ylabel("bottleneck bandwidth, DeepEP's accounting (GB/s)")
    ax_t.set_title("time")
    ax_b.set_title("bandwidth (NVLink for one node, RDMA across nodes)")
    handles, labels = ax_b.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8,
               frameon=False)
    fig.suptitle(title or "flexep plan")
    fig.tight_layout(rect=(0, 0.06 + 0.025 * ((len(labels) - 1) // 4), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # optional dependency: say how to get it
        raise RuntimeError("--plot needs matplotlib: pip install 'flexep[plot]'") from exc
    return plt


def plot_calibration(rows: Sequence, path: str) -> str:
    """Write ``path`` (PNG): predicted against published for every calibration row, one marker
    per table, with the +-15% and +-25% bands."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 6))
    markers = {"v1_normal": "*", "v1_low_latency": "D", "v2_normal": "o"}
    for table, marker in markers.items():
        pts = [(r.published.value, r.predicted) for r in rows if r.published.table == table]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=table, s=40)
    lo = min(min(r.published.value, r.predicted) for r in rows) * 0.8
    hi = max(max(r.published.value, r.predicted) for r in rows) * 1.2
    for f, style in ((1.0, "-"), (1.15, "--"), (1 / 1.15, "--"), (1.25, ":"), (1 / 1.25, ":")):
        ax.plot([lo, hi], [lo * f, hi * f], color="grey", linestyle=style, linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("published (GB/s or us)")
    ax.set_ylabel("predicted")
    ax.set_title("flexep plan vs DeepEP's published tables")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _overlay(ax_t, ax_b, published: Optional[Sequence[PublishedRow]]) -> None:
    """Published points as black/grey markers: filled = dispatch, hollow = combine."""
    for row in published or ():
        normal = row.table.endswith("normal")
        mode = "hierarchical" if normal else "low_latency"
        filled = row.phase == "dispatch"
        kw = dict(marker="*" if normal else "D", s=70 if normal else 40,
                  facecolors=_COLORS[mode] if filled else "none", edgecolors="black", zorder=5,
                  linewidths=1.0)
        if row.metric not in ("latency_us", "nvl_gbs", "rdma_gbs", "ll_gbs"):
            continue
        ax = ax_t if row.metric == "latency_us" else ax_b
        ax.scatter([row.ep], [row.value], **kw)
    tables = {"normal" if row.table.endswith("normal") else "low_latency" for row in published or ()}
    if "normal" in tables:
        ax_b.scatter([], [], marker="*", s=70, facecolors="grey", edgecolors="black",
                     label="DeepEP published, normal (filled dispatch, hollow combine)")
    if "low_latency" in tables:
        ax_b.scatter([], [], marker="D", s=40, facecolors="grey", edgecolors="black",
                     label="DeepEP published, low latency (filled dispatch, hollow combine)")
