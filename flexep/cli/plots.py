"""The plot ``flexep bench --plot PNG`` writes (needs matplotlib: ``pip install flexep[plot]``)."""

from __future__ import annotations

__all__ = ["plot"]


def plot(s: dict, path: str) -> None:
    """Bytes per link class and time per variant (flat vs hierarchical, per channel count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = s["variants"]
    names = [v["name"] for v in vs]
    world = s["world"]
    fig, (ax_b, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = range(len(vs))
    for i, (link, color) in enumerate((("intra", "#4C72B0"), ("inter", "#DD8452"))):
        vals = [(v[f"dispatch_{link}_bytes"] + v[f"combine_{link}_bytes"]) / world / 1e6 for v in vs]
        ax_b.bar([x + 0.38 * i for x in xs], vals, width=0.38, color=color, label=f"{link}-node")
    ax_b.set_xticks([x + 0.19 for x in xs], names, rotation=20)
    ax_b.set_ylabel("MB sent per rank (dispatch + combine)")
    ax_b.set_title("Bytes per link class")
    ax_b.set_ylim(0, ax_b.get_ylim()[1] * 1.25)  # headroom for the legend
    ax_b.legend(loc="upper center", ncol=2)
    ax_t.bar(xs, [v["dispatch_s"] * 1e3 for v in vs], color="#55A868", label="dispatch")
    ax_t.bar(xs, [v["combine_s"] * 1e3 for v in vs], bottom=[v["dispatch_s"] * 1e3 for v in vs],
             color="#C44E52", label="combine")
    raw = (s["times_s"]["raw_dispatch"] + s["times_s"]["raw_combine"]) * 1e3
    ax_t.axhline(raw, color="black", linestyle="--", label="raw all_to_all_single (flat bytes)")
    ax_t.set_xticks(list(xs), names, rotation=20)
    ax_t.set_ylabel("ms (slowest rank, median)")
    ax_t.set_title("Time per variant")
    ax_t.legend(fontsize=8)
    c = s["config"]
    fig.suptitle(f"flexep: world {c['world']}, ranks/node {c['ranks_per_node']}, "
                 f"{c['tokens']} tokens/rank, hidden {c['hidden']}, top-{c['topk']}/{c['experts']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
