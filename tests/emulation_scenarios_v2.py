"""Worker side of ``test_emulated_v2.py``: DeepEP V2's ``EPBuffer``/``ElasticBuffer`` on emulated
device tensors (see ``emulation.py``), host copies back for the parent's checks.

Every scenario makes DeepEP V2's calls in one go: dispatch, expanded dispatch, cached dispatch,
cached expanded dispatch, combine, expanded combine, and a dispatch with
``cumulative_local_expert_recv_stats``. Sync-free runs (``do_cpu_sync=False``) make all of them
inside ``host_reads(forbid=True)``: any device-to-host read fails the scenario with its frame.
"""

from __future__ import annotations

import emulation as em
import emulation_scenarios as sc
import torch

import flexep
from flexep.quant import per_token_cast_back

H = sc.H  # 256: FP8 needs a multiple of 128


def capacity(world: int) -> int:
    """DeepEP's ``num_max_tokens_per_rank``: the largest batch of any rank (equal everywhere)."""
    return max(sc.tokens_for(world))


def _bf16(x):
    return per_token_cast_back(*x).to(torch.bfloat16) if isinstance(x, tuple) else x.to(torch.bfloat16)


def v2_calls(rank: int, world: int, name: str, version: str = "2.5", sync: bool = False, x_kind: str = "bf16",
             alignment: int = 4, amr: bool = True, kind: str = "cuda", **buffer_kw) -> dict:
    """DeepEP V2's calls on the device; sync-free ones under ``host_reads(forbid=True)``."""
    experts = 8 * world
    inp = sc.inputs_for(name, rank, world, x_kind, experts)
    dev = sc.device(kind)
    x, topk, w = sc.to_dev(inp["x"], dev), inp["topk"].to(dev), inp["w"].to(dev)
    bias = torch.ones(topk.size(0), H, dtype=torch.bfloat16, device=dev)
    stats = torch.zeros(experts // world, dtype=torch.int32, device=dev)
    cls = flexep.EPBuffer if version == "2.5" else flexep.ElasticBuffer
    buf = cls(sc.ep_group(world), num_max_tokens_per_rank=capacity(world), hidden=H, num_topk=topk.size(1),
              allow_multiple_reduction=amr, explicitly_destroy=True, num_experts=experts, timeout=sc.TIMEOUT,
              **buffer_kw)
    args = dict(topk_idx=topk, topk_weights=w, num_experts=experts, expert_alignment=alignment,
                do_cpu_sync=sync)
    reads = {}

    def call(label, fn, *a, **kw):
        with em.host_reads(forbid=not sync) as log:
            out = fn(*a, **kw)
        reads[label] = (log.count, log.report())
        return out

    d = call("dispatch", buf.dispatch, x, **args)
    de = call("expanded dispatch", buf.dispatch, x, do_expand=True, use_tma_aligned_col_major_sf=True, **args)
    dc = call("cached dispatch", buf.dispatch, x, handle=d[3])
    dce = call("cached expanded dispatch", buf.dispatch, x, handle=de[3], topk_weights=w, do_expand=True,
               do_zero_padding=True)
    c = call("combine", buf.combine, _bf16(d[0]), d[3], topk_weights=d[2], bias=bias)
    ce = call("expanded combine", buf.combine, _bf16(de[0]), de[3], topk_weights=de[2] if amr else None,
              bias=bias)
    call("dispatch with stats", buf.dispatch, x, cumulative_local_expert_recv_stats=stats, **args)
    h, eh = d[3], de[3]
    sc.expect_on(dev, recv_x=d[0], recv_topk_idx=d[1], recv_topk_weights=d[2], expanded=de[0], cached=dc[0],
                 cached_expanded=dce[0], combined=c[0], combined_w=c[1], expanded_combined=ce[0],
                 psum=h.psum_num_recv_tokens_per_scaleup_rank, meta=h.recv_src_metadata)
    out = dict(recv_x=d[0], recv_idx=d[1], recv_w=d[2], expanded=de[0], expanded_w=de[2], cached=dc[0],
               cached_idx=dc[1], cached_expanded=dce[0], cached_expanded_w=dce[2], combined=c[0],
               combined_w=c[1], expanded_combined=ce[0], expanded_combined_w=ce[1], stats=stats,
               psum_scaleup=h.psum_num_recv_tokens_per_scaleup_rank,
               psum_expert=h.psum_num_recv_tokens_per_expert,
               expanded_psum_expert=eh.psum_num_recv_tokens_per_expert, meta=h.recv_src_metadata,
               expanded_meta=eh.recv_src_metadata, counts_list=h.num_recv_tokens_per_expert_list,
               sf_strides=de[0][1].stride() if isinstance(de[0], tuple) else None)
    buf.destroy()
    return dict(sc.cpu(out), reads=reads)


def lb_calls(rank: int, world: int, kind: str = "cuda") -> dict:
    """``lb_prefetch_weights`` and ``lb_reduce_grads`` on device tensors in the buffer's storage."""
    dev = sc.device(kind)
    local, slots, width = 2, 2, 8
    plan = flexep.BufferAllocator()
    red_w = plan.allocate((slots, width), torch.float32)
    red_g = plan.allocate((slots, width), torch.float32)
    buf = flexep.EPBuffer(sc.ep_group(world), num_bytes=flexep.get_num_allocation_alignment(),
                          lb_allocation_plan_or_num_bytes=plan, explicitly_destroy=True, timeout=sc.TIMEOUT)
    mapping = lb_mapping(world, local, slots).to(dev)
    weights = torch.stack([lb_row(rank * local + j, width) for j in range(local)]).to(dev)
    red_w.fill_(-1.0)
    buf.lb_prefetch_weights(red_w, weights, mapping).wait()
    grads = weights.clone()
    red_g.copy_(torch.arange(slots * width, dtype=torch.float32, device=dev).view(slots, width) + 100 * rank)
    buf.lb_reduce_grads(red_g, grads, mapping).wait()
    sc.expect_on(dev, red_w=red_w, red_g=red_g, grads=grads, storage=buf.runtime.lb_storage)
    out = sc.cpu(dict(red_w=red_w, red_g=red_g, grads=grads,
                      first_at_storage=red_w.data_ptr() == buf.runtime.lb_storage.data_ptr()))
    buf.destroy()
    return out


def lb_mapping(world: int, local: int, slots: int) -> torch.Tensor:
    """Ring: rank r holds experts of rank r + 1 in its slots (never its own), last slot empty at world 1."""
    rows = []
    for r in range(world):
        owner = (r + 1) % world
        rows.append([owner * local + c % local if owner != r else -1 for c in range(slots)])
    return torch.tensor(rows, dtype=torch.int32)


def lb_row(expert: int, width: int) -> torch.Tensor:
    return torch.arange(width, dtype=torch.float32) + 1000 * expert
