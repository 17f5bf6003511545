"""The baselines in ``flexep bench``'s summary (JSON), table and conclusion."""

from __future__ import annotations

from ..common import compare
from .availability import DOCS

__all__ = ["summarise", "table_rows", "conclusion"]

FLEXEP = "flexep_layer"
# table row prefixes (the table's first column is 34 characters wide)
SHORT = {FLEXEP: "flexep layer", "torchtitan": "torchtitan", "megatron": "Megatron-Core"}


def summarise(info: dict, t: dict, cpu: dict, flexep_bench_s: float) -> dict:
    """Per baseline: its status and, for those that ran, seconds per phase (slowest rank, median)
    and ratios ``flexep / theirs`` (below 1: flexep is faster).

    ``info`` is :attr:`Suite.info`; ``t``/``cpu`` the bench's wall/CPU figures per phase;
    ``flexep_bench_s`` the bench's layout + dispatch + combine of its main variant.
    """
    out = {}
    for name, entry in info.items():
        row = dict(entry)
        if entry["status"] == "ok":
            for which, figures in (("", t), ("cpu_", cpu)):
                d, c = figures[f"{name} dispatch"], figures[f"{name} combine"]
                row.update({f"{which}dispatch_s": d, f"{which}combine_s": c, f"{which}total_s": d + c})
        out[name] = row
    layer = out.get(FLEXEP, {}).get("total_s")
    for name, row in out.items():
        if name != FLEXEP and row["status"] == "ok":
            row["ratio_flexep_bench"] = flexep_bench_s / row["total_s"]
            if layer:
                row["ratio_flexep_layer"] = layer / row["total_s"]
    return out


def table_rows(baselines: dict) -> list:
    """Rows in the bench table's format: dispatch, combine and their sum per baseline that ran."""
    lines = ["as each MoE layer drives it (dispatch with routing metadata, combine with weighting):"]
    for name, row in baselines.items():
        if row["status"] != "ok":
            continue
        short = SHORT.get(name, name)
        for phase, key in (("dispatch", "dispatch_s"), ("combine", "combine_s"),
                           ("dispatch+combine", "total_s")):
            lines.append(f"{short + ' ' + phase:<34}{row[key] * 1e3:>9.2f}{row['cpu_' + key] * 1e3:>8.1f}")
    return lines


def conclusion(baselines: dict, flexep_bench_s: float) -> list:
    """The comparison in words (flexep's Buffer calls, then flexep's layer path, against each
    framework that ran), then one note per framework that did not run."""
    lines = []
    ran = [r for n, r in baselines.items() if n != FLEXEP and r["status"] == "ok"]

    def against(ours: float) -> str:
        return ", ".join(f"{compare(ours, r['total_s'], r['label'])} ({r['version']}: "
                         f"{r['total_s'] * 1e3:.1f} ms)" for r in ran)

    if ran:
        lines.append(f"flexep layout+dispatch+combine took {flexep_bench_s * 1e3:.1f} ms: "
                     f"{against(flexep_bench_s)}, on the same tokens and routing; theirs also "
                     "reorder rows to experts and weight the expert outputs, which a layer on "
                     "flexep does outside dispatch and combine (next line).")
    layer = baselines.get(FLEXEP, {})
    if ran and layer.get("status") == "ok":
        lines.append(f"With the same boundaries (each as its MoE layer drives it: routing metadata, "
                     f"reorder to experts, weighting; stand-in experts untimed; all checked against "
                     f"the reference), flexep's MoELayer path took {layer['total_s'] * 1e3:.1f} ms: "
                     f"{against(layer['total_s'])}.")
    for row in baselines.values():
        if row["status"] == "skipped":
            lines.append(f"note: {row['label']} skipped: {row['reason']}; install with "
                         f"`{row['install']}` (see {DOCS})")
        elif row["status"] == "failed":
            lines.append(f"note: {row['label']} FAILED and is left out: {row['reason']}")
    return lines
