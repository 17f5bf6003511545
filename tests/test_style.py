"""The code base passes ruff (configuration in pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e .[test])")
def test_ruff_clean():
    paths = [p for p in ("flexep", "tests", "examples", "benchmarks", "scripts")
             if os.path.isdir(os.path.join(ROOT, p))]
    proc = subprocess.run(["ruff", "check", *paths], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
