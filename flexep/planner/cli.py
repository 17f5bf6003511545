"""``flexep plan``: predict dispatch/combine time and bandwidth on a described cluster.

Examples::

    flexep plan                                   # h800_ib, DeepEP V1 profile, EP 8..256
    flexep plan --preset h200_efa,b200_ib --profile deepep_v2 --ep 16,32 --modes hierarchical
    flexep plan --preset my_cluster.json --profile flexep_nccl
    flexep plan --calibrate                       # fit and cross-validation vs DeepEP's tables
    flexep plan --heldout                         # other systems' published results (not fitted)
    flexep plan --preset h800_roce_tor --ep 128 --modes hierarchical --channels 1,2,4,8
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

__all__ = ["main", "build_parser", "format_table"]


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
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_args(p)
    return p


def add_args(p: argparse.ArgumentParser) -> None:
    """``flexep plan`` options."""
    p.add_argument("--preset", default="h800_ib",
                   help="hardware preset name(s) or .json file(s), comma-separated (see --list-presets)")
    p.add_argument("--profile", default="deepep_v1",
                   help="implementation profile(s), comma-separated (see --list-profiles)")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--list-profiles", action="store_true", help="list the profiles and exit")
    p.add_argument("--ep", type=_ints, default=[8, 16, 32, 64, 128, 256], help="EP sizes")
    p.add_argument("--modes", type=_names(MODES), default=list(MODES), help="modes to predict")
    p.add_argument("--channels", type=_ints, default=None,
                   help="flows (queue pairs) per peer, what ECMP hashes; default: the profile's")
    p.add_argument("--sms", type=int, default=None,
                   help="SMs of a normal-mode call (default: the profile's; DeepEP V2 sizes it)")
    p.add_argument("--copy-channels", type=int, default=None,
                   help="earlier name: kernel channels of 2 SMs each, same as --sms 2N")
    g = p.add_argument_group("model shape")
    g.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    g.add_argument("--hidden", type=int, default=7168)
    g.add_argument("--topk", type=int, default=8)
    g.add_argument("--experts", type=int, default=256)
    g.add_argument("--dispatch-dtype", default="fp8", choices=("fp8", "int8", "bf16", "fp16", "fp32"))
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
                     help="DeepEP's published tables: fit error and leave-one-table-out error")
    out.add_argument("--fit", action="store_true",
                     help="with --calibrate: refit the constants and print the new profiles/fitted.py")
    out.add_argument("--heldout", action="store_true",
                     help="other systems' published results predicted with the shipped constants")


def main(argv: Optional[list] = None) -> int:
    """Entry point of ``flexep plan``; returns the exit status."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """``flexep plan`` with parsed options."""
    from . import presets
    from .profile import get_profile, profile_names
    if args.list_presets:
        for name in presets.preset_names():
            print(f"{name:<20} {presets.get_preset(name).description}")
        return 0
    if args.list_profiles:
        for name in profile_names():
            prof = get_profile(name)
            tag = "" if prof.calibrated else " [estimated]"
            print(f"{name:<14} {prof.description}{tag}")
        return 0
    if args.copy_channels is not None:
        if args.sms is not None:
            print("flexep plan: error: give --sms or --copy-channels, not both", file=sys.stderr)
            return 2
        args.sms = 2 * args.copy_channels
    if args.sms is not None and args.sms < 1:
        print(f"flexep plan: error: --sms must be >= 1, got {args.sms}", file=sys.stderr)
        return 2
    try:
        if args.calibrate:
            return _calibrate(args)
        if args.heldout:
            return _heldout(args)
        hws = [presets.get_preset(n.strip()) for n in args.preset.split(",") if n.strip()]
        profs = [get_profile(n.strip()) for n in args.profile.split(",") if n.strip()]
        return _plan(hws, profs, args)
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
        recorded = torch.load(args.recorded, weights_only=True)  # a tensor: no code runs on load
    return Routing(args.routing, zipf_s=args.zipf_s, groups=args.groups,
                   masked_slots=args.masked_slots, recorded=recorded)


def _plan(hws, profs, args) -> int:
    from .calibration import published_for
    from .plan import plan
    from .workload import ModelShape
    shape = ModelShape(tokens_per_rank=args.tokens, hidden=args.hidden, topk=args.topk,
                       num_experts=args.experts, dispatch_dtype=args.dispatch_dtype,
                       combine_dtype=args.combine_dtype)
    routing = _routing(args)
    channels = args.channels or [None]
    series = [(hw.name, p) for hw in hws for prof in profs
              for p in plan(hw, shape, routing, args.ep, args.modes, channels, prof, args.sms, args.seed)]
    if args.json:
        print(json.dumps({"shape": shape.__dict__, "routing": routing.describe(),
                          "predictions": [dict(preset=n, **p.as_dict()) for n, p in series]},
                         indent=1))
    else:
        print(f"shape: {shape.tokens_per_rank} tokens/rank, hidden {shape.hidden}, "
              f"top-{shape.topk} of {shape.num_experts} experts, dispatch {shape.dispatch_dtype}, "
              f"combine {shape.combine_dtype}; routing: {routing.describe()}")
        print(format_table(series))
        uncalibrated = sorted({p.name for p in profs if not p.calibrated})
        if uncalibrated:
            print(f"note: profile(s) {', '.join(uncalibrated)} are estimates, not fitted to measurements")
    if args.plot:
        from .plot import plot_predictions
        published = published_for(shape) if any(hw.name == "h800_ib" for hw in hws) else ()
        plot_predictions(series, args.plot, published,
                         title=f"{', '.join(hw.name for hw in hws)}: {shape.tokens_per_rank} tokens/rank, "
                               f"routing {routing.describe()}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def format_table(series) -> str:
    """Predictions as a fixed-width text table; ``why`` lists the kinds of cost by share."""
    head = (f"{'preset':<14}{'profile':<12}{'EP':>4}  {'mode':<13}{'phase':<9}{'ch':>3}{'SMs':>4}"
            f"{'time_us':>10}{'deepep_GB/s':>12}{'nic_GB/s':>9}  why")
    lines = [head, "-" * len(head)]
    order = {name: i for i, name in enumerate(dict.fromkeys(n for n, _ in series))}
    modes = {m: i for i, m in enumerate(MODES)}
    series = sorted(series, key=lambda s: (order[s[0]], s[1].profile, s[1].ep, modes[s[1].mode],
                                           s[1].phase != "dispatch", s[1].channels))
    for name, p in series:
        lines.append(f"{name[:13]:<14}{p.profile[:11]:<12}{p.ep:>4}  {p.mode:<13}{p.phase:<9}{p.channels:>3}"
                     f"{p.sms or '':>4}{p.time_us:>10.1f}{p.deepep_gbs:>12.1f}{p.bandwidth_gbs['nic']:>9.1f}"
                     f"  {p.why}")
    return "\n".join(lines)


def _calibrate(args) -> int:
    from .calibration import PUBLISHED, cross_validate, evaluate, fit, format_calibration, format_fit, prepare
    cases = prepare(PUBLISHED, args.seed)
    fitted = None
    if args.fit:
        fitted, loss = fit(cases)
        print(f"# refitted (loss {loss:.5f}); save as flexep/planner/profiles/fitted.py:")
        print(format_fit(fitted))
    rows = evaluate(cases, fitted)
    cv = cross_validate(cases)
    if args.json:
        cvrows = {(r.published.table, r.published.ep, r.published.phase, r.published.metric,
                   r.published.preset, r.published.sms): r.rel_error for lst in cv.values() for r in lst}
        print(json.dumps([dict(table=r.published.table, preset=r.published.preset, ep=r.published.ep,
                               sms=r.published.sms, phase=r.published.phase, metric=r.published.metric,
                               published=r.published.value, predicted=r.predicted, rel_error=r.rel_error,
                               cv_rel_error=cvrows.get((r.published.table, r.published.ep, r.published.phase,
                                                        r.published.metric, r.published.preset,
                                                        r.published.sms)),
                               why=r.prediction.why) for r in rows], indent=1))
    else:
        print(format_calibration(rows, cv))
    if args.plot:
        from .plot import plot_calibration
        plot_calibration(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if all(r.within_target for r in rows) else 1


def _heldout(args) -> int:
    from .heldout import format_heldout, heldout_rows, summarize
    rows = heldout_rows(seed=args.seed)
    if args.json:
        print(json.dumps({"rows": [dict(source=r.source, ep=r.ep, phase=r.phase, metric=r.metric,
                                        published=r.published, predicted=r.predicted,
                                        rel_error=r.rel_error, why=r.prediction.why) for r in rows],
                          "summary": summarize(rows)}, indent=1))
    else:
        print(format_heldout(rows))
    return 0
