"""The ``flexep`` command: ``flexep bench``, ``flexep stress``, ``flexep plan``.

Each subcommand module offers ``add_args(parser)`` and ``run(args) -> exit status`` (and a
``main(argv)`` of its own); they share running on ranks, timing and reporting through
:mod:`flexep.cli.common`. ``flexep <command> --help`` lists a command's options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

_COMMANDS = {
    "bench": ("flexep.cli.bench", "time dispatch/combine next to raw all-to-all baselines (local Gloo "
              "ranks, or the torchrun ranks)"),
    "stress": ("flexep.cli.stress", "randomised soak with verification against the oracle"),
    "plan": ("flexep.planner.cli", "predict dispatch/combine time on a described cluster"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexep", description="Expert-parallel MoE token exchange.")
    sub = p.add_subparsers(dest="command", metavar="command", required=True)
    for name, (module, help_) in _COMMANDS.items():
        mod = importlib.import_module(module)
        sp = sub.add_parser(name, help=help_, description=help_)
        mod.add_args(sp)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
