"""The report of ``flexep stress``: per-rank tallies summed into one table (or JSON)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .stress import StressConfig

__all__ = ["summarize", "format_report", "failure_text"]


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(tallies: list[dict], cfg: StressConfig, wall: float) -> dict:
    """Merge the ranks' tallies; latency of iteration i is the slowest rank's."""
    per_iter = [max(t["latencies"][i] for t in tallies) for i in range(len(tallies[0]["latencies"]))]
    return dict(
        world=cfg.world, seed=cfg.seed, iterations=tallies[0]["iterations"], normal=tallies[0]["normal"],
        path="hierarchical" if tallies[0]["hierarchical"] else "flat",
        low_latency=tallies[0]["low_latency"], verify=True,
        tokens_moved=sum(t["tokens"] for t in tallies), bytes_moved=sum(t["bytes"] for t in tallies),
        mismatches=len(set().union(*(t["mismatched"] for t in tallies))),
        latency_ms=dict(p50=1e3 * _percentile(per_iter, 0.5), p99=1e3 * _percentile(per_iter, 0.99),
                        max=1e3 * max(per_iter, default=0.0)),
        wall_s=wall, problems=[p for t in tallies for p in t["problems"]][:10],
        growth=dict(threads=max(t["resources"]["end"]["threads"] - t["resources"]["start"]["threads"]
                                for t in tallies),
                    fds=max(t["resources"]["end"]["fds"] - t["resources"]["start"]["fds"] for t in tallies)))


def format_report(rep: dict) -> str:
    lat = rep["latency_ms"]
    lines = [
        f"flexep stress: world {rep['world']}, {rep['path']} normal path, seed {rep['seed']}, verify on",
        f"  iterations    {rep['iterations']} ({rep['normal']} normal, {rep['low_latency']} low-latency)",
        f"  tokens moved  {rep['tokens_moved']} rows received ({rep['bytes_moved'] / 1e6:.1f} MB sent)",
        f"  mismatches    {rep['mismatches']}",
        f"  latency       p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, max {lat['max']:.2f} ms "
        "(dispatch + combine per iteration, slowest rank)",
        f"  wall time     {rep['wall_s']:.1f} s",
        f"  growth        {rep['growth']['threads']} threads, {rep['growth']['fds']} open files "
        "(from iteration 10 to the end, worst rank)",
    ]
    for p in rep["problems"]:
        lines.append(f"  ! iteration {p['iteration']}: {'; '.join(p['problems'])} ({p['case']})")
    return "\n".join(lines)


def failure_text(errors: list) -> str:
    """Each failed rank's last line, then the full traceback of the root cause: the first error
    that is not a peer reacting to another rank's failure."""
    lines = [str(e).strip().splitlines()[-1] for e in errors]
    reactions = ("PeerFailureError", "CommTimeoutError", "RemoteInputError", "BrokenCommunicatorError")
    kinds = [last.split(":", 1)[0].rsplit(".", 1)[-1] for last in lines]
    root = next((e for e, kind in zip(errors, kinds) if kind not in reactions), errors[0])
    return "\n".join([*lines, "", str(root)])
