#!/usr/bin/env bash
# The accelerator check (see scripts/device_check.py): installs nothing, runs in under 5 minutes.
# On a machine without an accelerator it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" exec python scripts/device_check.py "$@"
