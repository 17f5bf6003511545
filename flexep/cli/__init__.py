"""The ``flexep`` command: ``flexep bench``, ``flexep stress``, ``flexep plan``.

Each subcommand's options are listed by ``flexep <subcommand> --help``.
"""

from __future__ import annotations

import sys
from typing import Optional

_COMMANDS = {
    "bench": ("flexep.cli.bench", "dispatch/combine benchmark on local Gloo ranks (or torchrun)"),
    "stress": ("flexep.cli.stress", "randomised soak with verification, reports mismatches"),
    "plan": ("flexep.planner.cli", "predict dispatch/combine time on a described cluster"),
}


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        lines = ["usage: flexep <command> [options]", "", "commands:"]
        lines += [f"  {name:<8} {help_}" for name, (_, help_) in _COMMANDS.items()]
        print("\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(_COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
