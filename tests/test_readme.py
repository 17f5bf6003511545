"""The README cannot drift from the code: its snippet is the example, and its commands run.

* The quick-start snippet is a verbatim excerpt of ``examples/quickstart.py``.
* Every command of the README's command-line block runs here as written, with arguments
  appended that shrink it to seconds (argparse keeps the last value of a repeated option), or
  is named in ``ELSEWHERE`` with the test that runs it; that test's source must carry the
  command's script and options.
* The two set-up commands are what ``.ci/run`` runs in a fresh virtual environment.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def _section(title: str) -> str:
    text = _readme()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def _blocks(text: str, lang: str) -> list:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def readme_commands() -> list:
    """The command-line block's commands, comments stripped."""
    [block] = _blocks(_section("Command line"), "bash")
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


# Appended to a README command (by its first two words) to make it a seconds-long run.
SHRINK = {
    "flexep bench": ["--quick", "--tokens", "16", "--hidden", "128", "--iters", "1", "--warmup", "0"],
    "flexep stress": ["--iters", "4"],
    "flexep plan": [],
}
# Appended by script; ``{tmp}`` is the test's temporary directory.
SHRINK_EXAMPLE = {
    "examples/train_tiny_moe.py": ["--steps", "2", "--tokens-per-rank", "8", "--out", "{tmp}/ckpt"],
    "examples/serve_decode.py": ["--ckpt", "{tmp}/ckpt", "--batch", "1", "--steps", "2"],
}
# README commands run by another test, with the options it must use.
ELSEWHERE = {
    "python examples/serve_decode.py --ranks 4 --redundant 4 --kill-rank 1 --at-step 5":
        ("test_elastic_examples.py", ["serve_decode.py", "--redundant", "--kill-rank", "--at-step"]),
    "python examples/train_tiny_moe.py --ranks 4 --steps 30 --kill-rank 2 --at-step 17":
        ("test_elastic_examples.py", ["train_tiny_moe.train", "killed"]),
    "bash scripts/device_check.sh": ("test_device_check.py", ["device_check.sh", "device_check.py"]),
}


def _argv(command: str, tmp: str) -> list:
    words = shlex.split(command)
    if words[0] == "flexep":
        return [sys.executable, "-m", "flexep", *words[1:], *SHRINK[" ".join(words[:2])]]
    if words[0] == "python" and words[1] in SHRINK_EXAMPLE:
        extra = [w.format(tmp=tmp) for w in SHRINK_EXAMPLE[words[1]]]
        return [sys.executable, os.path.join(ROOT, words[1]), *words[2:], *extra]
    raise AssertionError(f"README command {command!r} has no shrink rule and no test in ELSEWHERE")


def _run(argv: list, timeout: float = 240) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_quickstart_snippet_is_an_excerpt_of_the_example():
    [snippet] = _blocks(_section("Quick start (a laptop is enough)"), "python")
    with open(os.path.join(ROOT, "examples", "quickstart.py"), encoding="utf-8") as f:
        example = [line.strip() for line in f]
    missing = [line for line in snippet.splitlines() if line.strip() and line.strip() not in example]
    assert not missing, f"README quick-start lines not in examples/quickstart.py: {missing}"


def test_quickstart_runs():
    assert "match the single-process reference" in _run([sys.executable, os.path.join(ROOT, "examples",
                                                                                      "quickstart.py")])


def test_setup_commands_are_what_ci_runs():
    text = _readme()
    for marker in ("ci:main", "ci:test"):
        assert re.search(rf"<!-- {marker} -->\n```bash\n.+\n```", text), f"README lost its {marker} command"
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert "ci:main" in ci and "ci:test" in ci and "--quick" in ci
    assert "--quick" in _readme().split("<!-- ci:main -->")[0].strip().rsplit("\n\n", 1)[-1], \
        "the README must document the short run .ci/run uses"


def test_every_readme_command_is_covered():
    for command in readme_commands():
        if command in ELSEWHERE:
            test_file, needles = ELSEWHERE[command]
            with open(os.path.join(ROOT, "tests", test_file), encoding="utf-8") as f:
                source = f.read()
            missing = [n for n in needles if n not in source]
            assert not missing, f"{test_file} no longer runs {command!r} (missing {missing})"
        else:
            _argv(command, "/tmp")  # raises for a command nothing runs
    assert set(ELSEWHERE) <= set(readme_commands()), "ELSEWHERE names a command the README dropped"


def _run_here() -> list:
    """The README commands this file runs (the rest are in ``ELSEWHERE``)."""
    return [c for c in readme_commands() if c not in ELSEWHERE]


@pytest.mark.timeout(900)
def test_readme_commands_run(tmp_path):
    """Each README command, shrunk, exits 0 and prints its report. Two at a time: most of each
    run is process start-up and rank spawning, which leaves a core idle; the serving example
    runs after the rest, since it reads the checkpoint the training example writes."""
    commands = _run_here()
    last = [c for c in commands if "serve_decode" in c]

    def run(command: str) -> None:
        out = _run(_argv(command, str(tmp_path)))
        assert out.strip(), f"{command!r} printed nothing"

    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(run, c) for c in commands if c not in last]:
            future.result()
    for command in last:
        run(command)
