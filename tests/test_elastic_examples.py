"""The elastic examples keep their claims, on short runs with a real SIGKILL.

* ``train_tiny_moe.py --kill-rank 2 --at-step 6``: the survivors continue at EP size 3 from the
  step-4 checkpoint, and their loss curve equals, bit for bit, a separate run started at EP size
  3 from that checkpoint (``--resume``), which also shows the example runs without a kill.
* ``serve_decode.py --kill-rank 1 --at-step 3``: the command line runs the workload fault-free
  and with the kill and reports every token equal, with detection and recovery times.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from flexep import Buffer, checkpoint
from flexep.launch import run_local

pytestmark = pytest.mark.faults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import train_tiny_moe  # noqa: E402
from tiny_moe_model import CONFIG, TinyMoEModel  # noqa: E402


@pytest.mark.timeout(300)
def test_training_continues_at_the_smaller_ep_size_from_the_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    steps, tokens, timeout = 10, 32, 5.0
    killed = run_local(train_tiny_moe.train, 4, (steps, tokens, out, (2, 6), 4, None, timeout),
                       timeout=240, allow_failures=True)
    assert isinstance(killed[2], Exception)
    assert all(isinstance(r, dict) for i, r in enumerate(killed) if i != 2), killed
    first = killed[0]
    [event] = first["events"]
    assert (event["failed_at"], event["resumed_at"], event["world"], event["lost"]) == (6, 4, 3, (2,))
    assert 0 <= event["detected_at"] - event["kill_time"] <= timeout + 8.0
    assert [s for s, *_ in first["log"]] == list(range(6)) + list(range(4, steps))
    resumed = run_local(train_tiny_moe.train, 3, (steps, tokens, str(tmp_path / "ref"), (-1, -1), 0,
                                                  os.path.join(out, "elastic", "step-000004"), timeout),
                        timeout=240)
    after = [(s, w, loss) for s, w, loss, *_ in first["log"][6:]]
    reference = [(s, w, loss) for s, w, loss, *_ in resumed[0]["log"]]
    assert after == reference  # bitwise: the same losses, at EP size 3, from step 4 on
    assert all(w == 3 for _, w, _ in after) and reference[0][0] == 4
    assert after[-1][2] < first["log"][0][2]  # it is still learning


@pytest.mark.timeout(300)
def test_serving_example_answers_every_request_identically(tmp_path, gloo_world1):
    ckpt = str(tmp_path / "ckpt")
    model = TinyMoEModel(Buffer(gloo_world1), seed=5)
    checkpoint.save(model, ckpt)
    torch.save(torch.arange(CONFIG.num_experts, 0, -1), os.path.join(ckpt, "expert_load.pt"))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(EXAMPLES, "serve_decode.py"), "--ckpt", ckpt, "--ranks", "4",
           "--redundant", "4", "--batch", "2", "--steps", "6", "--kill-rank", "1", "--at-step", "3",
           "--timeout", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "requests completed: 8/8; tokens equal to the fault-free run: 48/48 (bitwise)" in text, text
    found = re.search(r"rank 1 killed at step 3: detected after ([\d.]+) s, recovered in ([\d.]+) s .*"
                      r"EP 4 -> 3, policy rerun", text)
    assert found, text
    assert float(found.group(1)) <= 4 + 1 + 8.0 and float(found.group(2)) <= 4 + 8.0
