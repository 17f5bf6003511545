"""``flexep plan``: predict dispatch/combine time and bandwidth on a described cluster.

Examples::

    flexep plan                                   # h800_ib, DeepSeek-V3 shape, EP 8..256
    flexep plan --calibrate                       # predicted vs DeepEP's published tables
    flexep plan --preset h800_ib,h800_roce_tor --ep 128 --modes hierarchical \\
        --channels 1,2,4,8 --copy-channels 12     # ECMP: more channels per peer on RoCE
    flexep plan --routing zipf --zipf-s 1.2 --json
    flexep plan --plot plan.png

Also ``python -m flexep.planner``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from .traffic import MODES

__all__ = ["main", "build_parser"]


def _ints(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def _names(choices):
    def parse(text: str) -> list[str]:
        out = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in out if t not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return out
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexep plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="h800_ib",
                   help="hardware preset(s), comma-separated (see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--ep", type=_ints, default=[8, 16, 32, 64, 128, 256], help="EP sizes")
    p.add_argument("--modes", type=_names(MODES), default=list(MODES), help="modes to predict")
    p.add_argument("--channels", type=_ints, default=None,
                   help="channels (flows per peer and kernel copy units); default: the preset's")
    p.add_argument("--copy-channels", type=int, default=None,
                   help="pin the kernel's copy units, so --channels only changes flows per peer")
    g = p.add_argument_group("model shape")
    g.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    g.add_argument("--hidden", type=int, default=7168)
    g.add_argument("--topk", type=int, default=8)
    g.add_argument("--experts", type=int, default=256)
    g.add_argument("--dispatch-dtype", default="fp8", choices=("fp8", "bf16", "fp16", "fp32"))
    g.add_argument("--combine-dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    r = p.add_argument_group("routing")
    r.add_argument("--routing", default="group_limited",
                   choices=("uniform", "zipf", "group_limited", "recorded"))
    r.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent (--routing zipf)")
    r.add_argument("--groups", type=int, default=None,
                   help="nodes per token for group_limited (default min(nodes, 4))")
    r.add_argument("--masked-slots", type=int, default=0, help="top-k slots set to -1 per rank")
    r.add_argument("--recorded", default=None,
                   help="torch.save'd topk_idx, [T, K] or [W, T, K] (--routing recorded)")
    p.add_argument("--seed", type=int, default=0)
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print JSON instead of a table")
    out.add_argument("--plot", metavar="PNG", default=None, help="also write a plot")
    out.add_argument("--calibrate", action="store_true",
                     help="predict DeepEP's published tables with the preset and print the errors")
    return p


def main(argv: Optional[list] = None) -> int:
    """Entry point of ``flexep plan``; returns the exit status."""
    args = build_parser().parse_args(argv)
    from . import presets
    if args.list_presets:
        for name in presets.preset_names():
            print(f"{name:<16} {presets.get_preset(name).description}")
        return 0
    try:
        hws = [presets.get_preset(n.strip()) for n in args.preset.split(",") if n.strip()]
        if args.calibrate:
            return _calibrate(hws[0], args)
        return _plan(hws, args)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as exc:
        print(f"flexep plan: error: {exc}", file=sys.stderr)
        return 2


def _routing(args):
    from .routing import Routing
    recorded = None
    if args.routing == "recorded":
        if not args.recorded:
            raise ValueError("--routing recorded needs --recorded FILE (a torch.save'd topk_idx)")
        import torch
        recorded = torch.load(args.recorded)
    return Routing(args.routing, zipf_s=args.zipf_s, groups=args.groups,
                   masked_slots=args.masked_slots, recorded=recorded)


def _plan(hws, args) -> int:
    from .calibration import published_for
    from .plan import plan
    from .workload import ModelShape
    shape = ModelShape(tokens_per_rank=args.tokens, hidden=args.hidden, topk=args.topk,
                       num_experts=args.experts, dispatch_dtype=args.dispatch_dtype,
                       combine_dtype=args.combine_dtype)
    routing = _routing(args)
    channels = args.channels or [None]
    series = [(hw.name, p) for hw in hws
              for p in plan(hw, shape, routing, args.ep, args.modes, channels, args.copy_channels,
                            args.seed)]
    if args.json:
        print(json.dumps({"shape": shape.__dict__, "routing": routing.describe(),
                          "predictions": [dict(preset=n, **p.as_dict()) for n, p in series]},
                         indent=1))
    else:
        print(f"shape: {shape.tokens_per_rank} tokens/rank, hidden {shape.hidden}, "
              f"top-{shape.topk} of {shape.num_experts} experts, dispatch {shape.dispatch_dtype}, "
              f"combine {shape.combine_dtype}; routing: {routing.describe()}")
        print(format_table(series))
    if args.plot:
        from .plot import plot_predictions
        published = published_for(shape) if any(hw.name == "h800_ib" for hw in hws) else ()
        plot_predictions(series, args.plot, published,
                         title=f"{', '.join(hw.name for hw in hws)}: {shape.tokens_per_rank} tokens/rank, "
                               f"routing {routing.describe()}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def format_table(series) -> str:
    """Predictions as a fixed-width text table."""
    head = (f"{'preset':<14}{'EP':>4}  {'mode':<13}{'phase':<9}{'ch':>3}{'time_us':>10}"
            f"{'deepep_GB/s':>12}{'nic_GB/s':>9}  {'bottleneck':<11}{'ecmp':>6}")
    lines = [head, "-" * len(head)]
    order = {name: i for i, name in enumerate(dict.fromkeys(n for n, _ in series))}
    modes = {m: i for i, m in enumerate(MODES)}
    series = sorted(series, key=lambda s: (order[s[0]], s[1].ep, modes[s[1].mode],
                                           s[1].phase != "dispatch", s[1].channels))
    for name, p in series:
        lines.append(f"{name:<14}{p.ep:>4}  {p.mode:<13}{p.phase:<9}{p.channels:>3}{p.time_us:>10.1f}"
                     f"{p.deepep_gbs:>12.1f}{p.bandwidth_gbs['nic']:>9.1f}  {p.bottleneck:<11}"
                     f"{p.ecmp_slowdown:>6.2f}")
    return "\n".join(lines)


def _calibrate(hw, args) -> int:
    from .calibration import PUBLISHED, calibrate, format_calibration
    rows = calibrate(hw, seed=args.seed)
    if args.json:
        print(json.dumps([dict(table=r.published.table, ep=r.published.ep, phase=r.published.phase,
                               metric=r.published.metric, published=r.published.value,
                               predicted=r.predicted, rel_error=r.rel_error,
                               bottleneck=r.prediction.bottleneck) for r in rows], indent=1))
    else:
        print(format_calibration(rows, hw.name))
    if args.plot:
        from .plot import plot_predictions
        seen, series = set(), []
        for r in rows:
            key = (r.prediction.ep, r.prediction.mode, r.prediction.phase)
            if key not in seen:
                seen.add(key)
                series.append((hw.name, r.prediction))
        plot_predictions(series, args.plot, PUBLISHED,
                         title=f"{hw.name} vs DeepEP's published V1 tables (normal: 4096 tokens/rank, "
                               f"low latency: 128 tokens/rank)")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if all(r.within_target for r in rows) else 1
