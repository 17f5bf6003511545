"""flexep.device: backends per device type, and the group a Buffer moves data on when a framework
hands it a CPU group for setup only (vLLM's V1 managers pass their Gloo ``cpu_group``)."""

from __future__ import annotations

import pytest
import torch

import flexep
import flexep.core.communicator as communicator
from flexep.device import backend_for, data_backend, setup_group_backend

pytestmark = pytest.mark.unit


def test_backend_for():
    assert [backend_for(k) for k in ("cuda", "npu", "xpu", "cpu")] == ["nccl", "hccl", "xccl", "gloo"]
    with pytest.raises(ValueError, match="no known collective backend for device type 'mps'"):
        backend_for("mps")


@pytest.mark.parametrize("group, default, want", [
    ("gloo", "nccl", "nccl"),                              # vLLM's cpu_group on a GPU
    ("gloo", "cpu:gloo,cuda:nccl", "nccl"),
    ("gloo", "hccl", "hccl"),
    ("gloo", "cpu:gloo,xpu:xccl", "xccl"),
    ("nccl", "nccl", None),                                # a device group: used as given
    ("cpu:gloo,cuda:nccl", "cpu:gloo,cuda:nccl", None),
    ("gloo", "gloo", None),                                # a Gloo world: CPU tensors on purpose
    ("mpi", "nccl", None),
])
def test_setup_group_backend(group, default, want):
    assert setup_group_backend(group, default) == want


def test_gloo_world_keeps_its_group(gloo_world1):
    assert data_backend(gloo_world1) is None
    buf = flexep.Buffer(gloo_world1)
    assert buf.comm.group is gloo_world1 and buf.comm.host_group is None


def test_setup_only_group_moves_data_on_its_own_group(gloo_world1, monkeypatch):
    """The wiring, with Gloo standing in for the accelerator's backend: data on a new group over
    the same ranks, control over the one given, results unchanged; the face still reports the
    caller's group."""
    monkeypatch.setattr(communicator, "data_backend", lambda group: "gloo")
    buf = flexep.Buffer(gloo_world1)
    assert buf.group is gloo_world1
    assert buf.comm.group is not gloo_world1 and buf.comm.host_group is gloo_world1
    x = torch.randn(5, 64).to(torch.bfloat16)
    idx = torch.tensor([[0, 1], [2, -1], [3, 0], [1, 2], [-1, -1]])
    w = torch.rand(5, 2)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 4)
    recv_x, _, _, counts, handle, _ = buf.dispatch(
        x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    assert counts == [2, 2, 2, 1] and torch.equal(recv_x, x[:4])
    combined, _, _ = buf.combine(recv_x, handle)
    assert torch.equal(combined[:4], x[:4]) and combined[4].eq(0).all()
