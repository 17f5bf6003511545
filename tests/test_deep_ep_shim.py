"""The opt-in ``deep_ep`` shim (``shims/deep_ep``): a caller's unmodified ``import deep_ep`` runs on
flexep; a real DeepEP is never shadowed silently; the package installs with pip.

Each check runs a fresh interpreter (the shim decides at import time).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from flexep.launch import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = os.path.join(ROOT, "shims", "deep_ep")

# A caller written for DeepEP, untouched: Megatron-style V1 (EventOverlap(EventHandle()) events,
# layout then dispatch, combine) and torchtitan/DeepSpeed-style V2 (ElasticBuffer, EPHandle).
CALLER = textwrap.dedent("""
    import torch
    import torch.distributed as dist

    import deep_ep
    from deep_ep.utils import EventHandle, EventOverlap

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
    group = dist.group.WORLD
    x = torch.randn(4, 256).to(torch.bfloat16)
    topk = torch.tensor([[0, 1], [1, -1], [2, 3], [-1, -1]]).to(deep_ep.topk_idx_t)
    weights = torch.rand(4, 2)

    buffer = deep_ep.Buffer(group, 0, 0)
    previous = EventOverlap(EventHandle())
    n_rank, n_rdma, n_expert, in_rank, event = buffer.get_dispatch_layout(topk, 4, previous_event=previous)
    recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
        x, topk_idx=topk, topk_weights=weights, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
        is_token_in_rank=in_rank, num_tokens_per_expert=n_expert)
    combined, _, _ = buffer.combine(recv_x, handle)
    assert torch.equal(combined[:3], x[:3]) and counts == [1, 2, 1, 1]

    hint = deep_ep.ElasticBuffer.get_buffer_size_hint(group, 8, 256, num_topk=2)
    v2 = deep_ep.ElasticBuffer(group, num_bytes=hint, num_max_tokens_per_rank=8, hidden=256, num_topk=2,
                               explicitly_destroy=True)
    recv_x, recv_idx, recv_w, handle, event = v2.dispatch(
        x, topk_idx=topk, topk_weights=weights, num_experts=4, do_expand=True, expert_alignment=1)
    assert isinstance(handle, deep_ep.EPHandle) and recv_idx is None
    assert handle.num_recv_tokens_per_expert_list == [1, 2, 1, 1]
    combined, combined_w, event = v2.combine(recv_x, handle=handle, topk_weights=recv_w)
    per_slot = (x.float() * (topk >= 0).sum(1, keepdim=True)).to(torch.bfloat16)  # one row per chosen expert
    assert torch.equal(combined, per_slot) and torch.equal(combined_w, torch.where(topk >= 0, weights, 0.0))
    v2.destroy()
    print("caller ran on", deep_ep.__file__)
""")


def _run(code: str, path: list, tmp_path, env_extra: dict = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    env.pop("FLEXEP_DEEP_EP_SHIM", None)
    env.update(dict(env_extra))
    script = tmp_path / "caller.py"
    script.write_text(code)
    return subprocess.run([sys.executable, "-W", "ignore", str(script)], env=env, capture_output=True,
                          text=True, timeout=180, cwd=tmp_path)


@pytest.mark.slow
def test_unmodified_caller_runs_through_the_shim(tmp_path):
    out = _run(CALLER.format(port=free_port()), [SHIM, ROOT], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"caller ran on {os.path.join(SHIM, 'deep_ep', '__init__.py')}" in out.stdout


def _fake_real_deepep(root, kind: str) -> str:
    """A directory that looks like a real DeepEP install of ``kind``; returns the sys.path entry."""
    site = os.path.join(root, f"site-{kind}")
    if kind == "package":  # another deep_ep package on sys.path (its import would be real DeepEP's)
        os.makedirs(os.path.join(site, "deep_ep"))
        open(os.path.join(site, "deep_ep", "__init__.py"), "w").write("raise RuntimeError('real DeepEP')\n")
    elif kind == "distribution":  # pip metadata of an installed DeepEP wheel
        os.makedirs(os.path.join(site, "deep_ep-2.1.0.dist-info"))
        open(os.path.join(site, "deep_ep-2.1.0.dist-info", "METADATA"), "w").write(
            "Metadata-Version: 2.1\nName: deep_ep\nVersion: 2.1.0\n")
    else:  # DeepEP's compiled extension inside the same directory (installed over the shim)
        shutil.copytree(os.path.join(SHIM, "deep_ep"), os.path.join(site, "deep_ep"))
        open(os.path.join(site, "deep_ep", "_C.cpython-311-x86_64-linux-gnu.so"), "wb").close()
    return site


REFUSAL = textwrap.dedent("""
    import os
    try:
        import deep_ep
    except ImportError as exc:
        print("refused:", exc)
    else:
        print("imported without refusing")
    os.environ["FLEXEP_DEEP_EP_SHIM"] = "force"  # the override, in the same interpreter
    import deep_ep
    print("forced:", deep_ep.__flexep__)
""")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["package", "distribution", "extension"])
def test_shim_refuses_to_shadow_a_real_deepep(tmp_path, kind):
    site = _fake_real_deepep(tmp_path, kind)
    path = [site, ROOT] if kind == "extension" else [SHIM, site, ROOT]
    out = _run(REFUSAL, path, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    refused = [line for line in out.stdout.splitlines() if line.startswith("refused:")]
    assert refused and "refuses to shadow a real DeepEP" in refused[0], out.stdout
    assert "FLEXEP_DEEP_EP_SHIM=force" in refused[0] and "forced: True" in out.stdout
    named = {"package": os.path.join(site, "deep_ep"), "distribution": "distribution deep_ep 2.1.0",
             "extension": "_C.cpython"}[kind]
    assert named in refused[0], refused[0]  # the message says what it found


@pytest.mark.slow
def test_shim_installs_with_pip(tmp_path):
    try:
        setuptools_major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        setuptools_major = 0
    if setuptools_major < 64:  # the shim's build requirement; building offline cannot fetch it
        pytest.skip("setuptools>=64 is needed to build the shim offline")
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                          "--no-index", "--quiet", "--target", str(target), SHIM],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert any(p.name.startswith("flexep_deep_ep-") for p in target.iterdir())
    out = _run(CALLER.format(port=free_port()), [str(target), ROOT], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert str(target) in out.stdout
