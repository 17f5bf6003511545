"""``flexep bench``'s text report: per-phase times, bytes, ratios and the one-line conclusions."""

from __future__ import annotations

from .common import compare

__all__ = ["format_table"]


def _floor_lines(s: dict) -> list:
    f, t = s["inter_node_floor"], s["times_s"]
    lines = ["", f"Inter-node floor: the busiest node (node {f['busiest_node']}) moves {f['rows']} "
             f"(token, node) rows each way, {f['dispatch_bytes'] / 1e6:.2f} MB in dispatch and "
             f"{f['combine_bytes'] / 1e6:.2f} MB in combine (from the routing, token data only)"]
    if f["total_s"] is None:
        lines.append("  no link rate known (give --link-gbit and --paths, or run under netbed): "
                     "no time floor")
        return lines
    lines[-1] += (f"; at {f['paths']} path(s) x {f['gbit']:g} Gbit/s ({f['rate_source']}) that is "
                  f"{f['total_s'] * 1e3:.1f} ms dispatch+combine")
    lines.append(f"{'variant':<34}{'d+c ms':>9}{'vs floor':>10}")
    for v in s["variants"]:
        lines.append(f"{v['name']:<34}{(v['dispatch_s'] + v['combine_s']) * 1e3:>9.1f}"
                     f"{f['vs_floor'][v['name']]:>9.2f}x")
    lines.append(f"{'raw flat a2a (flat rows)':<34}{(t['raw_dispatch'] + t['raw_combine']) * 1e3:>9.1f}"
                 f"{f['vs_floor']['raw flat a2a']:>9.2f}x")
    return lines


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}x" if b else ("1.00x" if a == 0 else "inf")


def format_table(s: dict) -> str:
    """The benchmark as readable text: per-phase times, bytes and ratios."""
    c, t, cpu, world = s["config"], s["times_s"], s["cpu_s"], s["world"]
    lines = ["(MB/rank counts every byte handed to the transport, this rank's own block included; "
             "'vs min' is that total over the routing's minimum)",
             f"flexep bench: world {c['world']}, {c['tokens']} tokens/rank, hidden {c['hidden']}, "
             f"top-{c['topk']} of {c['experts']} experts, {'FP8' if c['fp8'] else 'BF16'} dispatch, "
             f"BF16 combine, ranks/node {c['ranks_per_node']} "
             f"({c['world'] // c['ranks_per_node']} node(s)), device {c['device']}"
             + ("" if c.get("checks", True) else ", checks off (check_consistency=False, validate=False)"),
             f"{'phase':<34}{'time ms':>9}{'cpu ms':>8}{'GB/s/rank':>11}{'MB/rank':>9}{'vs min':>8}"
             f"{'inter MB':>10}",
             "-" * 89]

    def line(name, keys, nbytes, ratio="", inter=None):
        secs, cpu_s = sum(t[k] for k in keys), sum(cpu[k] for k in keys)
        gbps = nbytes / secs / 1e9 if secs and nbytes else 0.0
        inter_s = f"{inter / 1e6:.2f}" if inter is not None else ""
        lines.append(f"{name:<34}{secs * 1e3:>9.2f}{cpu_s * 1e3:>8.1f}{gbps:>11.3f}{nbytes / 1e6:>9.2f}"
                     f"{ratio:>8}{inter_s:>10}")

    line("layout", ["layout"], 0)
    links = ("local", "intra", "inter")
    for v in s["variants"]:
        for op in ("dispatch", "combine"):
            sent = sum(v[f"{op}_{k}_bytes"] for k in links)
            low = sum(v[f"{op}_{k}_min"] for k in links)
            line(f"{op} ({v['name']})", [f"{v['name']} {op}"], sent // world, _ratio(sent, low),
                 v[f"{op}_inter_bytes"] / world)
    main = s["variants"][0]
    line(f"dispatch+combine ({main['name']})", [f"{main['name']} dispatch", f"{main['name']} combine"],
         sum(main[f"{op}_{k}_bytes"] for op in ("dispatch", "combine") for k in links) // world)
    line("raw all_to_all_single, flat bytes", ["raw_dispatch", "raw_combine"], s["raw_bytes_per_rank"])
    line("  same, into reused buffers (floor)", ["floor_dispatch", "floor_combine"],
         s["raw_bytes_per_rank"])
    line("naive per-(token,expert) a2a", ["naive"], 2 * s["naive_bytes_per_rank"])
    if "baselines" in s:
        from .baselines.report import table_rows
        lines += table_rows(s["baselines"])
    ours = main["dispatch_s"] + main["combine_s"]
    raw = t["raw_dispatch"] + t["raw_combine"]
    floor = t["floor_dispatch"] + t["floor_combine"]
    sent = sum(main[f"{op}_{k}_bytes"] for op in ("dispatch", "combine") for k in links)
    low = sum(main[f"{op}_{k}_min"] for op in ("dispatch", "combine") for k in links)
    lines.append("")
    lines.append(f"flexep dispatch+combine ({main['name']}) took {ours * 1e3:.1f} ms: "
                 f"{compare(ours, raw, 'raw all_to_all_single of the same bytes')} "
                 f"({compare(ours, floor, 'the same into reused buffers')}; CPU time "
                 f"{s['cpu_ratio_vs_raw']:.2f}x raw), "
                 f"{compare(ours, t['naive'], 'a naive per-(token, expert) exchange')} that moves "
                 f"{_ratio(2 * s['naive_bytes_per_rank'] * world, sent)} the bytes; "
                 f"bytes sent {_ratio(sent, low)} the routing's minimum.")
    if "baselines" in s:
        from .baselines.report import conclusion
        lines += conclusion(s["baselines"], t["layout"] + ours)
    flat = [v for v in s["variants"] if not v["hierarchical"]]
    hier = [v for v in s["variants"] if v["hierarchical"]]
    if flat and hier:
        f, h = flat[0], hier[0]
        fewer = _ratio(f["dispatch_inter_bytes"], h["dispatch_inter_bytes"])
        lines.append(f"Hierarchical sends {fewer} fewer inter-node dispatch bytes than flat "
                     f"({h['dispatch_inter_bytes'] / 1e6:.2f} vs "
                     f"{f['dispatch_inter_bytes'] / 1e6:.2f} MB, "
                     f"{_ratio(h['dispatch_inter_bytes'], h['dispatch_inter_min'])} its minimum) and is "
                     f"{compare(h['dispatch_s'] + h['combine_s'], f['dispatch_s'] + f['combine_s'], 'flat')} "
                     + ("here." if (s.get("inter_node_floor") or {}).get("total_s") else
                        "here (all links of one host are equally fast; see docs/benchmarks.md for a "
                        "network)."))
    if "inter_node_floor" in s:
        lines += _floor_lines(s)
    return "\n".join(lines)
