"""Every ``deep_ep`` import path real callers use resolves: on ``import flexep as deep_ep`` and, as
literally written, through the ``deep_ep`` shim (``shims/deep_ep``).

Sources (the import lines as each project writes them; ``docs/deepep-v2.md`` lists them):
Megatron-LM ``megatron/core/transformer/moe/fused_a2a.py`` and
``token_dispatcher.py`` (V1 and the newer ElasticBuffer path); vLLM ``all2all.py`` and the
``deepep_ht``/``deepep_ll``/``deepep_v2`` prepare-finalize modules; SGLang
``token_dispatcher/deepep.py``, ``deepep_v2.py`` and the DeepEP 2.5 adapter; torchtitan
``distributed/deepep/deepep.py`` (V2 and the earlier V1 imports); DeepSpeed PR #8213
``auto_ep_comm.py``; DeepEP's own V2 tests. Not included: ``HybridEPBuffer`` (DeepEP's separate
hybrid-ep branch) and ``ReductionMode`` (not in upstream DeepEP).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest

import flexep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = os.path.join(ROOT, "shims", "deep_ep")

# Per caller: the import statements it writes, and the attributes it then reads from ``deep_ep``.
CALLERS = {
    "Megatron-LM": (["import deep_ep", "from deep_ep import Buffer",
                     "from deep_ep.utils import EventHandle, EventOverlap"],
                    ["Buffer", "ElasticBuffer", "EventHandle", "EventOverlap"]),
    "vLLM": (["import deep_ep"], ["Buffer", "Config", "EventOverlap", "ElasticBuffer", "EPHandle"]),
    "SGLang": (["from deep_ep import Buffer, Config", "from deep_ep import ElasticBuffer",
                "from deep_ep import EPBuffer", "from deep_ep import BufferAllocator, get_num_tma_alignment",
                "from deep_ep.utils.envs import get_physical_domain_size"], []),
    "torchtitan": (["from deep_ep import ElasticBuffer",
                    "from deep_ep import Buffer, EventHandle, EventOverlap",
                    "from deep_ep.utils import EventHandle, EventOverlap"], []),
    "DeepSpeed": (["import deep_ep"], ["ElasticBuffer", "topk_idx_t"]),
    "DeepEP tests": (["from deep_ep.utils.math import align, count_bytes, calc_diff, per_token_cast_back, "
                      "per_token_cast_to_fp8, safe_div",
                      "from deep_ep.utils.gate import get_unbalanced_scores",
                      "from deep_ep.utils.envs import init_dist, init_seed, dist_print",
                      "from deep_ep.utils.refs import dispatch, combine, generate_pre_combine_data, "
                      "ordered_accumulate",
                      "from deep_ep.utils.testing import bench_kineto",
                      "from deep_ep.comm import barrier, get_comm_stream, destroy_all_managed_nccl_comm",
                      "from deep_ep import get_num_allocation_alignment, get_logical_domain_size"], []),
}


def _resolve_on_flexep(line: str) -> None:
    """``line`` evaluated with ``deep_ep`` meaning ``flexep`` (modules and attributes)."""
    m = re.fullmatch(r"import deep_ep", line) or re.fullmatch(r"from deep_ep(\.[\w.]+)? import (.+)", line)
    assert m, line
    if line == "import deep_ep":
        return
    module = importlib.import_module("flexep" + (m.group(1) or ""))
    for name in (n.strip() for n in m.group(2).split(",")):
        assert hasattr(module, name), f"{line}: flexep{m.group(1) or ''} has no {name}"


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_imports_resolve_on_flexep_as_deep_ep(caller):
    lines, attrs = CALLERS[caller]
    for line in lines:
        _resolve_on_flexep(line)
    for name in attrs:
        assert hasattr(flexep, name), f"{caller} reads deep_ep.{name}"


def _shim_env(extra: dict = ()) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SHIM, ROOT]))
    env.pop("FLEXEP_DEEP_EP_SHIM", None)
    env.update(dict(extra))
    return env


@pytest.mark.slow
def test_imports_resolve_through_the_shim_as_written(tmp_path):
    """One interpreter runs every caller's lines verbatim: ``import deep_ep`` is flexep."""
    body = ["import deep_ep", "assert deep_ep.__flexep__"]
    for caller, (lines, attrs) in CALLERS.items():
        body += lines + [f"assert hasattr(deep_ep, {a!r}), {caller!r}" for a in attrs]
    body += ["import deep_ep.buffers.elastic, deep_ep.buffers.ep, deep_ep.buffers.legacy",
             "from deep_ep.buffers import allocator, base",
             "assert deep_ep.ElasticBuffer is __import__('flexep').ElasticBuffer", "print('resolved')"]
    script = tmp_path / "caller.py"
    script.write_text("\n".join(body) + "\n")
    out = subprocess.run([sys.executable, "-W", "ignore", str(script)], env=_shim_env(), capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and "resolved" in out.stdout, out.stderr[-3000:]
