"""DeepEP API surface that needs no peers: Config, size hints, events, constructor checks."""

from __future__ import annotations

import pytest
import torch

import flexep
import flexep as deep_ep
from flexep.config import Config


def test_config_validation_and_rounding():
    assert Config(24, 8, 256).num_channels == 12
    assert Config(24, 8, 720, 16, 128).num_max_rdma_chunked_recv_tokens == 128
    assert Config(20, 6, 256, 6, 100).num_max_rdma_chunked_recv_tokens == 102  # rounded up to 6k
    with pytest.raises(ValueError, match="num_sms must be >= 0"):
        Config(-2)
    with pytest.raises(ValueError, match="nvl_chunked_send_tokens <"):
        Config(20, 256, 256)
    with pytest.raises(ValueError, match="half of"):
        Config(20, 6, 256, 128, 100)
    with pytest.raises(TypeError, match="num_sms must be an int"):
        Config(2.5)


def test_size_hints_match_deepep_worked_values():
    assert deep_ep.Buffer.get_dispatch_config(8).get_nvl_buffer_size_hint(14336, 8) == 335_709_824
    cfg24 = Config(24, *[6, 256, 6, 128])
    assert cfg24.get_nvl_buffer_size_hint(14336, 8) == 402_851_712
    assert Config(24, 36, 288, 20, 128).get_nvl_buffer_size_hint(14336, 16) == 453_208_704
    assert Config(24, 36, 288, 20, 128).get_rdma_buffer_size_hint(14336, 16) == 110_265_216
    assert Config(24, 4, 288, 12, 128).get_rdma_buffer_size_hint(14336, 16) == 103_964_544
    assert Config().get_rdma_buffer_size_hint(14336, 8) == 0
    with pytest.raises(ValueError, match="multiple of 8"):
        Config().get_nvl_buffer_size_hint(14336, 12)


def test_tuned_configs_and_num_sms():
    old = deep_ep.Buffer.num_sms
    try:
        deep_ep.Buffer.set_num_sms(24)
        cfg = deep_ep.Buffer.get_dispatch_config(4)
        assert cfg.num_sms == 24
        assert (cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_nvl_chunked_recv_tokens) == (6, 256)
        assert deep_ep.Buffer.get_combine_config(2).num_max_nvl_chunked_send_tokens == 10
        with pytest.raises(ValueError, match="even"):
            deep_ep.Buffer.set_num_sms(23)
    finally:
        deep_ep.Buffer.num_sms = old


def test_event_overlap_semantics():
    ev = deep_ep.Buffer.capture()
    assert isinstance(ev, deep_ep.EventOverlap) and ev.event is not None
    ev.current_stream_wait()
    with deep_ep.EventOverlap(None) as none_event:
        pass
    with pytest.raises(ValueError, match="holds no event"):
        none_event.current_stream_wait()


def test_exports_match_deepep():
    for name in ("Buffer", "Config", "EventOverlap", "topk_idx_t"):
        assert hasattr(deep_ep, name)
    assert deep_ep.topk_idx_t is torch.int64
    assert deep_ep.Buffer.is_sm90_compiled()


def test_constructor_checks(gloo_world1):
    with pytest.raises(ValueError, match="got None"):
        flexep.Buffer(None)
    with pytest.raises(ValueError, match="mpi4py"):
        flexep.Buffer(None, comm=object())
    with pytest.raises(ValueError, match="num_nvl_bytes must be a multiple of 128"):
        flexep.Buffer(gloo_world1, 100)
    with pytest.raises(ValueError, match="num_rdma_bytes must be >= 0"):
        flexep.Buffer(gloo_world1, 0, -128)
    with pytest.raises(ValueError, match="timeout"):
        flexep.Buffer(gloo_world1, timeout=0)
    with pytest.raises(ValueError, match="ranks_per_node must divide"):
        flexep.Buffer(gloo_world1, ranks_per_node=2)
    buf = flexep.Buffer(gloo_world1, int(2e9), int(1e9), num_qps_per_rank=1, explicitly_destroy=True)
    assert (buf.rank, buf.group_size, buf.num_nvl_bytes) == (0, 1, int(2e9))
    buf.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        buf.get_dispatch_layout(torch.zeros(1, 1, dtype=torch.int64), 4)
    with pytest.raises(RuntimeError, match="explicitly_destroy"):
        flexep.Buffer(gloo_world1).destroy()


def test_local_buffer_tensor(gloo_world1):
    """DeepEP's raw views: whole buffer, byte offset, ``size``; allocated once, kept, writable
    (vLLM zeroes the RDMA buffer before a retry); bad arguments named."""
    buf = flexep.Buffer(gloo_world1, 1024, 4096)
    whole = buf.get_local_buffer_tensor(torch.int8, use_rdma_buffer=True)
    assert (whole.dtype, whole.shape, whole.device.type) == (torch.int8, (4096,), "cpu")
    whole.fill_(7)
    words = buf.get_local_buffer_tensor(torch.int32, offset=16, use_rdma_buffer=True)
    assert words.numel() == (4096 - 16) // 4 and words[0].item() == 0x07070707
    words.zero_()
    assert whole[:16].eq(7).all() and whole[16:].eq(0).all()  # the same memory
    nvl = buf.get_local_buffer_tensor(torch.bfloat16, size=(8, 64))
    assert nvl.shape == (8, 64) and nvl.data_ptr() == buf.get_local_buffer_tensor(torch.uint8).data_ptr()
    with pytest.raises(ValueError, match="size .* needs 1024 elements"):
        buf.get_local_buffer_tensor(torch.bfloat16, size=(16, 64))
    with pytest.raises(ValueError, match="offset must be a multiple of"):
        buf.get_local_buffer_tensor(torch.int32, offset=2)
    with pytest.raises(ValueError, match="past the end"):
        buf.get_local_buffer_tensor(torch.uint8, offset=2048)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        buf.get_local_buffer_tensor("int8")


def test_layout_on_one_rank(gloo_world1):
    buf = flexep.Buffer(gloo_world1)
    n_rank, n_rdma, n_expert, in_rank, event = buf.get_dispatch_layout(
        torch.tensor([[0, 3], [-1, 2]]), 4)
    assert n_rank.tolist() == [2] and n_rdma is None and n_expert.tolist() == [1, 0, 1, 1]
    assert in_rank.tolist() == [[True], [True]] and event.event is None
    _, _, _, _, event = buf.get_dispatch_layout(torch.tensor([[0]]), 4, async_finish=True)
    event.current_stream_wait()
