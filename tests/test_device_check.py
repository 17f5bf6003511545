"""The accelerator check script runs end to end (on the CPU here, with ``--device cpu``), so the
one run it gets on a lent GPU does not fail on a stale call."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_device_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    script = os.path.join(ROOT, "scripts", "device_check.py")
    proc = subprocess.run([sys.executable, script, "--device", "cpu", "--rows", "512", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["failures"] == [] and len(report["checks"]) >= 12 and all(report["checks"].values())
    assert set(report["gbps"]) >= {"device copy (read + write)", "row gather (dispatch staging)"}


@pytest.mark.slow
def test_device_check_without_an_accelerator_says_so():
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "device_check.sh")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "no accelerator here" in proc.stdout, proc.stdout + proc.stderr
