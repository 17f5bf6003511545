"""``flexep bench --baselines``: framework dispatchers skipped with a note where they are not
installed, run and checked where they are; the check can fail; their process-wide patches stay
inside their passes; nothing is imported or patched at flexep import time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from flexep.cli.baselines import FRAMEWORKS, availability
from flexep.cli.baselines.availability import DOCS, Framework, check_installed
from flexep.cli.baselines.harness import expected_dispatch, reference_combine
from flexep.cli.baselines.megatron_a2a import cuda_calls_on_cpu
from flexep.cli.baselines.report import conclusion, summarise, table_rows
from flexep.launch import run_local

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--world", "2", "--tokens", "16", "--hidden", "256", "--experts", "8", "--topk", "4",
         "--iters", "2", "--warmup", "0"]


def _fw(dist, version, modules=()):
    return Framework(name="x", label="X's dispatcher", dist=dist, version=version, modules=modules,
                     install="pip install x")


def test_check_installed_says_why():
    assert check_installed(_fw("flexep-no-such-distribution", "1.0")) == \
        (False, "flexep-no-such-distribution is not installed")
    ok, why = check_installed(_fw("torch", "0.0.1"))
    assert not ok and why.endswith("is installed; the driver is written for 0.0.1"), why
    import importlib.metadata
    version = importlib.metadata.version("torch")
    assert check_installed(_fw("torch", version, ("torch",))) == (True, version)
    ok, why = check_installed(_fw("torch", version, ("torch", "flexep_no_such_module")))
    assert not ok and why.endswith("but flexep_no_such_module is missing"), why


def test_nothing_imported_or_patched_at_import_time():
    # (torch itself imports NumPy where it is installed: only what flexep adds counts)
    code = ("import sys, torch; before = (torch.cuda.Stream, torch.cuda.current_device)\n"
            "loaded = set(sys.modules)\n"
            "import flexep, flexep.cli.bench, flexep.cli.baselines as b\n"
            "b.availability()\n"
            "print(sorted(m for m in set(sys.modules) - loaded if m.split('.')[0] in "
            "('torchtitan', 'megatron', 'numpy', 'spmd_types', 'tyro', 'triton')))\n"
            "print(before == (torch.cuda.Stream, torch.cuda.current_device))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout


def test_cuda_calls_on_cpu_restores_everything():
    saved = {n: getattr(torch.cuda, n) for n in ("Stream", "current_stream", "stream", "current_device")}
    original = object()
    module = types.SimpleNamespace(maybe_move_tensor_to_cpu=original)
    with pytest.raises(KeyError):
        with cuda_calls_on_cpu(module):
            assert torch.cuda.current_device() == torch.device("cpu")
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                stream.record_event().synchronize()  # the dispatcher's side-stream copy, on the CPU
            assert module.maybe_move_tensor_to_cpu(torch.tensor([3, 4])).tolist() == [3, 4]
            raise KeyError("a failing pass still restores")
    assert {n: getattr(torch.cuda, n) for n in saved} == saved
    assert module.maybe_move_tensor_to_cpu is original


def test_expected_dispatch_worked_example():
    # The docstring's example: W = 2, L = 1, K = 1.
    x0, x1 = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [4.0]])
    inputs = [(x0, torch.tensor([[1], [0]]), torch.tensor([[0.5], [0.25]])),
              (x1, torch.tensor([[0], [0]]), torch.tensor([[0.75], [1.0]]))]
    rows, weights, counts = expected_dispatch(0, inputs, 1)
    assert rows.flatten().tolist() == [2.0, 3.0, 4.0] and counts.tolist() == [3]
    assert weights.tolist() == [0.25, 0.75, 1.0]
    rows, weights, counts = expected_dispatch(1, inputs, 1)
    assert rows.flatten().tolist() == [1.0] and weights.tolist() == [0.5] and counts.tolist() == [1]
    # out[t] = sum_k w * s_e * x: s_0 = 1, s_1 = 1.25
    ref = reference_combine(x0, inputs[0][1], inputs[0][2], torch.tensor([1.0, 1.25]))
    assert ref.flatten().tolist() == [1.0 * 0.5 * 1.25, 2.0 * 0.25 * 1.0]


def test_report_rows_ratios_and_notes():
    info = {"flexep_layer": dict(label="flexep as its MoELayer drives it", status="ok", version=None),
            "torchtitan": dict(label="T's dispatcher", status="ok", version="0.3.0"),
            "megatron": dict(label="M's dispatcher", status="skipped",
                             reason="megatron-core is not installed", install="pip install m"),
            "other": dict(label="O's dispatcher", status="failed", version="1", reason="RuntimeError: bad")}
    t = {"flexep_layer dispatch": 0.01, "flexep_layer combine": 0.01, "torchtitan dispatch": 0.03,
         "torchtitan combine": 0.01}
    s = summarise(info, t, t, 0.02)
    assert s["torchtitan"]["total_s"] == pytest.approx(0.04)
    assert s["torchtitan"]["ratio_flexep_layer"] == pytest.approx(0.5)
    assert s["torchtitan"]["ratio_flexep_bench"] == pytest.approx(0.5)
    rows = "\n".join(table_rows(s))
    assert "torchtitan dispatch+combine" in rows and "40.00" in rows and "megatron" not in rows.lower()
    words = conclusion(s, 0.03)
    assert words[0].startswith("flexep layout+dispatch+combine took 30.0 ms: 1.3x faster than T's "
                               "dispatcher (0.3.0: 40.0 ms), on the same tokens and routing")
    assert words[1].startswith("With the same boundaries") and words[1].endswith(
        "flexep's MoELayer path took 20.0 ms: 2.0x faster than T's dispatcher (0.3.0: 40.0 ms).")
    assert words[2] == (f"note: M's dispatcher skipped: megatron-core is not installed; install with "
                        f"`pip install m` (see {DOCS})")
    assert words[3] == "note: O's dispatcher FAILED and is left out: RuntimeError: bad"
    assert len(words) == 4


@pytest.mark.parametrize("mode", [["--mode", "low-latency"], ["--api", "v2"]])
def test_baselines_only_with_the_v1_normal_bench(mode, capsys):
    from flexep.cli.bench import main
    assert main(["--baselines", *mode]) == 2
    assert "--baselines runs with the V1 normal-mode bench" in capsys.readouterr().err


@pytest.mark.ranks
def test_bench_with_baselines(tmp_path, capsys):
    """Where a framework is installed it runs and passes its check; where not, a note says why and
    how to install it. flexep's layer path always runs."""
    from flexep.cli.bench import main
    path = tmp_path / "bench.json"
    assert main([*SMALL, "--baselines", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(path.read_text())["baselines"]
    assert summary["flexep_layer"]["status"] == "ok", summary["flexep_layer"]
    assert summary["flexep_layer"]["check"]["dispatch_exact"]
    assert "flexep layer dispatch+combine" in out
    for name, (ok, why) in availability().items():
        entry, fw = summary[name], FRAMEWORKS[name][0].FRAMEWORK
        if ok:
            assert entry["status"] == "ok", entry
            assert entry["check"]["combine_max_rel_err"] <= entry["check"]["combine_rtol"]
            assert entry["version"] == fw.version and entry["total_s"] > 0
            assert f"{fw.label} ({fw.version}: " in out
        else:
            assert entry["status"] == "skipped" and entry["reason"] == why
            assert f"note: {fw.label} skipped: {why}; install with `{fw.install}` (see {DOCS})" in out


class _Corrupt:
    """flexep's layer path with one deliberate mistake, to show the check catches it."""

    @staticmethod
    def build(kind, buffer, x, idx, w, experts):
        from flexep.cli.baselines.flexep_layer import FlexepLayerDriver

        class Driver(FlexepLayerDriver):
            def dispatch(self):
                rows, counts, weights, state = super().dispatch()
                if kind == "rows" and rows.size(0) > 1:
                    rows = torch.cat([rows[1:2], rows[:1], rows[2:]])  # two rows swapped
                return rows, counts, weights, state

            def expert(self, rows, counts):
                y = super().expert(rows, counts)
                return y * 1.25 if kind == "scale" else y  # every expert off by a bf16-exact factor

            def combine(self, expert_out, state):
                pos, weights, m, handle = state
                if kind == "weights":
                    weights = weights.flip(0)
                return super().combine(expert_out, (pos, weights, m, handle))

        return Driver(buffer, x, idx, w, experts)


def _check_worker(rank, world):
    import torch.distributed as dist

    from flexep import Buffer
    from flexep.cli.baselines.harness import verify
    from flexep.cli.bench import BenchConfig, _routing
    cfg = BenchConfig(world=world, tokens=16, hidden=64, experts=8, topk=4)
    x, idx, w = _routing(cfg, rank, torch.device("cpu"))
    buf = Buffer(dist.group.WORLD, explicitly_destroy=True)
    caught = {}
    for kind in ("none", "rows", "scale", "weights"):
        driver = _Corrupt.build(kind, buf, x, idx, w, cfg.experts)
        _, step = driver.step()
        try:
            verify(kind, step, x, idx, w, cfg.experts, None)
            caught[kind] = None
        except RuntimeError as exc:
            caught[kind] = str(exc)
    buf.destroy()
    return caught


@pytest.mark.ranks
def test_check_can_fail():
    for caught in run_local(_check_worker, 2, timeout=180):
        assert caught["none"] is None
        assert "dispatch exact False" in caught["rows"]
        assert "dispatch exact True, combine within" in caught["scale"] and " False " in caught["scale"]
        assert "dispatch exact True" in caught["weights"] and " False " in caught["weights"]


def _framework_worker(rank, world, name):
    from flexep.cli.bench import BenchConfig, _routing
    cfg = BenchConfig(world=world, tokens=24, hidden=128, experts=8, topk=4)
    x, idx, w = _routing(cfg, rank, torch.device("cpu"))
    before = {n: getattr(torch.cuda, n) for n in ("Stream", "current_stream", "stream", "current_device")}
    mod = FRAMEWORKS[name][0]
    samples = mod.run(x, idx, w, cfg.experts, iters=3, warmup=1)  # raises if its check fails
    after = {n: getattr(torch.cuda, n) for n in before}
    return samples, before == after


@pytest.mark.ranks
@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_framework_for_real(name):
    ok, why = FRAMEWORKS[name][0].is_available()
    if not ok:
        pytest.skip(why)
    for samples, untouched in run_local(_framework_worker, 2, (name,), timeout=300):
        assert set(samples) == {"dispatch", "combine"}
        for phase in samples.values():
            assert len(phase) == 3 and all(len(s) == 2 and s[0] > 0 and s[1] >= 0 for s in phase)
        assert untouched  # torch.cuda is as it was once the passes are over
