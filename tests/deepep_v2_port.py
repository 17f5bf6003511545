"""DeepEP's V2 test ``tests/elastic/test_ep.py`` (and V2.5's ``tests/ep/test_ep.py``), ported to
Gloo ranks on CPU: the case grid, the five calls per case and every assertion, in DeepEP's order.

Source: deepseek-ai/DeepEP at dd758caf451848bd150e1046af3d0a73e5fff38d (V2.0) and the V2.5 test
at 1a1ffbac (``defer_epilogue`` launch path). What changes:

* sizes are small (``T`` 16 tokens, hidden 256, top-6 of 32 experts) and each rank sends
  ``max(1, T - rank)`` tokens as in DeepEP; worlds 1, 2, 4 and 2 virtual nodes of 2;
* the reference is :mod:`flexep.reference_v2`, computed on every rank from every rank's
  inputs (regenerated from seeds) instead of DeepEP's NCCL reference; ``generate_pre_combine_data``
  and ``ordered_accumulate`` are the same formulas;
* combine inputs that DeepEP leaves uninitialised (``torch.empty``: rows past the valid count,
  expanded padding rows) are filled with NaN, so a path that reads them fails;
* kernel timing (``bench_kineto``) is dropped; ``--deterministic``, ``--do-cpu-sync 0``,
  ``--allow-multiple-reduction 0``, ``--allow-hybrid-mode`` and ``--masked-ratio`` are
  :class:`Config` fields, one spawn each.

Like DeepEP's ``init_dist`` every rank makes BF16 the default dtype and runs under
``torch.inference_mode()``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

import flexep as deep_ep
from flexep.reference_v2 import align, pre_combine_data, ref_v2_combine, ref_v2_dispatch
from flexep.utils import calc_diff, per_token_cast_back, per_token_cast_to_fp8


@dataclass(frozen=True)
class Config:
    version: str = "2.0"  # "2.0": ElasticBuffer, "2.5": EPBuffer
    num_tokens: int = 16  # T = num_max_tokens_per_rank; rank r sends max(1, T - r)
    hidden: int = 256
    num_topk: int = 6
    num_experts: int = 32
    do_cpu_sync: bool = True
    allow_hybrid_mode: bool = True
    allow_multiple_reduction: bool = True
    deterministic: bool = False
    masked_ratio: float = 0.0
    defer_epilogue: bool = True  # V2.5's default
    ranks_per_node: Optional[int] = None
    cases: Optional[tuple] = None  # indices into the case grid (None: all)
    seed: int = 0


def enumerate_ep_modes(version: str, defer: bool):
    """DeepEP's grid: ``(do_handle_copy, A, fp8, num_bias, prev_event, async, alloc_on_comm)``."""
    copies = (1, 0) if version == "2.0" else (0,)
    asyncs = (1,) if version == "2.5" and defer else (0, 1)
    for do_handle_copy, alignment, fp8, num_bias, prev in itertools.product(copies, (128, 1), (1, 0),
                                                                             (0, 1, 2), (0, 1)):
        for async_ in asyncs:
            for alloc in ((1,) if prev else (0, 1)):
                yield do_handle_copy, alignment, fp8, num_bias, prev, async_, alloc


def launch(buffer, cfg: Config, name: str, with_previous_event: int, async_: int, params: dict):
    """DeepEP's ``launch``: optional ``previous_event``; V2.5 defers and takes the outputs from the
    event's first wait; otherwise an async call is waited on."""
    if with_previous_event:
        params.update(previous_event=buffer.capture())
    if cfg.version == "2.5" and cfg.defer_epilogue:
        event = getattr(buffer, name)(**params, defer_epilogue=True)
        return (*event.current_stream_wait(), event)
    values = getattr(buffer, name)(**params)
    if async_:
        values[-1].current_stream_wait()
    return values


def fold_expanded(expanded, indices: torch.Tensor, valid_mask: torch.Tensor):
    """DeepEP's fold check: every valid expanded row of a token holds the same data."""
    if not isinstance(expanded, torch.Tensor):
        return tuple(fold_expanded(t, indices, valid_mask) for t in expanded)
    if expanded.element_size() == 1 and expanded.is_floating_point():  # FP8: compare the bytes
        return fold_expanded(expanded.view(torch.uint8), indices, valid_mask).view(expanded.dtype)
    gathered = expanded[indices]
    first_valid_idx = valid_mask.to(torch.int).argmax(dim=1)
    folded = gathered[torch.arange(gathered.shape[0]), first_valid_idx]
    result = (gathered == folded.unsqueeze(1)).all(dim=-1)
    assert (result | ~valid_mask).all()
    return folded


def ordered_accumulate(data: torch.Tensor) -> torch.Tensor:
    """DeepEP's ``ordered_accumulate``: float32 sum over top-k in order, from zero."""
    result = torch.zeros((data.shape[0], data.shape[2]), dtype=torch.float32)
    for i in range(data.shape[1]):
        result += data[:, i, :].float()
    return result.to(data.dtype)


def _routing(cfg: Config, rank: int, world: int):
    """Scores ``[N, E]`` uniform (DeepEP's gate at ratio 1), ``topk(sorted=False)``, masking."""
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank)
    n = max(1, cfg.num_tokens - rank)
    scores = torch.rand(n, cfg.num_experts, generator=gen, dtype=torch.float32)
    topk_weights, topk_idx = torch.topk(scores, cfg.num_topk, dim=-1, largest=True, sorted=False)
    topk_idx = topk_idx.to(deep_ep.topk_idx_t)
    if cfg.masked_ratio > 0:
        mask = torch.rand(topk_idx.shape, generator=gen) < cfg.masked_ratio
        topk_idx.masked_fill_(mask, -1)
        topk_weights.masked_fill_(topk_idx < 0, 0)
    return topk_idx, topk_weights


def _case_inputs(cfg: Config, rank: int, case: int, fp8: int, num_bias: int):
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + case * 131 + rank)
    n = max(1, cfg.num_tokens - rank)
    x = torch.randn((n, cfg.hidden), generator=gen, dtype=torch.float32).to(torch.bfloat16)
    x = per_token_cast_to_fp8(x) if fp8 else x
    biases = [torch.randn((n, cfg.hidden), generator=gen, dtype=torch.float32).to(torch.bfloat16)
              for _ in range(num_bias)]
    bias = None if num_bias == 0 else biases[0] if num_bias == 1 else tuple(biases)
    return x, bias


def make_buffer(cfg: Config, group):
    cls = deep_ep.EPBuffer if cfg.version == "2.5" else deep_ep.ElasticBuffer
    return cls(group, num_max_tokens_per_rank=cfg.num_tokens, hidden=cfg.hidden,
               deterministic=cfg.deterministic,
               allow_hybrid_mode=cfg.allow_hybrid_mode, allow_multiple_reduction=cfg.allow_multiple_reduction,
               prefer_overlap_with_compute=False, explicitly_destroy=True, num_gpu_timeout_secs=100,
               num_cpu_timeout_secs=100, ranks_per_node=cfg.ranks_per_node)


@torch.inference_mode()
def run(rank: int, world: int, cfg: Config) -> int:
    """Every case of the grid on this rank; returns the number of cases checked."""
    torch.set_default_dtype(torch.bfloat16)
    group = dist.new_group(list(range(world)))
    buffer = make_buffer(cfg, group)
    num_scaleout_ranks, num_scaleup_ranks = buffer.get_logical_domain_size()
    t, hidden, num_topk, num_experts = cfg.num_tokens, cfg.hidden, cfg.num_topk, cfg.num_experts
    num_local_experts = num_experts // world
    num_sms = buffer.get_theoretical_num_sms(num_experts, num_topk)
    num_qps = buffer.get_theoretical_num_qps(num_sms)
    routing = [_routing(cfg, r, world) for r in range(world)]
    topk_idx, topk_weights = routing[rank]
    checked = 0
    for case, mode in enumerate(enumerate_ep_modes(cfg.version, cfg.defer_epilogue)):
        if cfg.cases is not None and case not in cfg.cases:
            continue
        check_case(cfg, buffer, rank, world, case, mode, routing, topk_idx, topk_weights, num_sms, num_qps,
                   num_scaleout_ranks, num_scaleup_ranks, num_local_experts, t, hidden, num_topk, num_experts)
        checked += 1
    buffer.destroy()
    return checked


def check_case(cfg, buffer, rank, world, case, mode, routing, topk_idx, topk_weights, num_sms, num_qps,
               num_scaleout_ranks, num_scaleup_ranks, num_local_experts, num_max_tokens_per_rank, hidden,
               num_topk,
               num_experts):
    (do_handle_copy, expert_alignment, use_fp8_dispatch, num_bias, with_previous_event,
     async_with_compute_stream, allocate_on_comm_stream) = mode
    inputs = [_case_inputs(cfg, r, case, use_fp8_dispatch, num_bias) for r in range(world)]
    x, bias = inputs[rank]

    def get_recv_x_bf16(recv_x) -> torch.Tensor:
        return per_token_cast_back(recv_x[0], recv_x[1]) if use_fp8_dispatch else recv_x

    # Reference (every rank's inputs -> this rank's outputs)
    xs = [i[0][0] if use_fp8_dispatch else i[0] for i in inputs]
    sfs = [i[0][1] for i in inputs] if use_fp8_dispatch else None
    ref = ref_v2_dispatch(xs, [r[0] for r in routing], num_experts, num_max_tokens_per_rank, 1,
                          [r[1] for r in routing], sfs)[rank]
    ref_recv_x = (ref.recv_x, ref.recv_scales) if use_fp8_dispatch else ref.recv_x
    ref_recv_x_bf16 = get_recv_x_bf16(ref_recv_x)
    ref_recv_topk_idx, ref_recv_topk_weights = ref.recv_topk_idx, ref.recv_topk_weights
    ref_recv_src_token_idx = torch.tensor(ref.src_global, dtype=torch.int)
    ref_num_recv_tokens_per_rank = ref.recv_per_source
    if cfg.allow_multiple_reduction:
        hybrid = cfg.allow_hybrid_mode and num_scaleout_ranks > 1
        reduced_combine_recipe = combine_recipe = (True, True) if hybrid else (True, False)
    else:
        reduced_combine_recipe, combine_recipe = (False, False), (True, False)
    ref_y = pre_combine_data(rank * num_max_tokens_per_rank + torch.arange(x[0].size(0) if use_fp8_dispatch
                                                                           else x.size(0)),
                             num_max_tokens_per_rank, num_topk, hidden, world)
    ref_y[topk_idx == -1] = 0
    bias_list = () if bias is None else (bias,) if isinstance(bias, torch.Tensor) else bias
    ref_reduced_combined_y = ref_v2_combine(ref_y, topk_idx, num_experts, world, num_scaleup_ranks, bias_list,
                                            *reduced_combine_recipe)
    ref_combined_y = ref_v2_combine(ref_y, topk_idx, num_experts, world, num_scaleup_ranks, bias_list,
                                    *combine_recipe)

    # Do dispatch
    dispatch_args = dict(x=x, topk_idx=topk_idx, topk_weights=topk_weights, num_sms=num_sms, num_qps=num_qps,
                         num_max_tokens_per_rank=num_max_tokens_per_rank, num_experts=num_experts,
                         expert_alignment=expert_alignment,
                         async_with_compute_stream=async_with_compute_stream,
                         allocate_on_comm_stream=allocate_on_comm_stream, do_cpu_sync=cfg.do_cpu_sync)
    if cfg.version == "2.0":
        dispatch_args["do_handle_copy"] = do_handle_copy
    recv_x, recv_topk_idx, recv_topk_weights, handle, _ = launch(buffer, cfg, "dispatch", with_previous_event,
                                                                  async_with_compute_stream,
                                                                  dict(dispatch_args))
    recv_x_bf16 = get_recv_x_bf16(recv_x)

    # Expanding mode
    expanded_dispatch_args = dispatch_args | dict(do_expand=True, use_tma_aligned_col_major_sf=True)
    expanded_recv_x, expanded_recv_topk_idx, expanded_recv_topk_weights, expanded_handle, _ = launch(
        buffer, cfg, "dispatch", with_previous_event, async_with_compute_stream, dict(expanded_dispatch_args))
    expanded_recv_x_bf16 = get_recv_x_bf16(expanded_recv_x)

    # Cached mode
    cached_dispatch_args = dict(x=x, num_sms=num_sms, num_qps=num_qps,
                                async_with_compute_stream=async_with_compute_stream,
                                allocate_on_comm_stream=allocate_on_comm_stream, handle=handle)
    cached_recv_x, cached_recv_topk_idx, _, cached_handle, _ = launch(
        buffer, cfg, "dispatch", with_previous_event, async_with_compute_stream, dict(cached_dispatch_args))

    # Cached expanding mode with zero padding
    cached_expanded_dispatch_args = cached_dispatch_args | dict(
        topk_weights=topk_weights, do_expand=True, use_tma_aligned_col_major_sf=True, do_zero_padding=True,
        handle=expanded_handle)
    cached_expanded_recv_x, _, cached_expanded_recv_topk_weights, _, _ = launch(
        buffer, cfg, "dispatch", with_previous_event, async_with_compute_stream,
        cached_expanded_dispatch_args)

    # Count the number of received tokens
    num_recv_tokens = handle.psum_num_recv_tokens_per_scaleup_rank[-1].item()
    assert num_recv_tokens == expanded_handle.psum_num_recv_tokens_per_scaleup_rank[-1].item()

    # Construct the input data for combine (NaN where DeepEP's input is uninitialised)
    src_token_global_idx = handle.recv_src_metadata[:num_recv_tokens, 0]
    assert torch.equal(ref_recv_src_token_idx, torch.sort(src_token_global_idx).values)
    local_y = pre_combine_data(src_token_global_idx, num_max_tokens_per_rank, num_topk, hidden, world)
    local_y[recv_topk_idx[:num_recv_tokens] == -1] = 0
    input_for_combine = torch.full(recv_x_bf16.shape, float("nan"), dtype=torch.bfloat16)
    input_for_combine[:num_recv_tokens] = ordered_accumulate(local_y)

    expanded_src_token_global_idx = expanded_handle.recv_src_metadata[:num_recv_tokens, 0]
    assert torch.equal(ref_recv_src_token_idx, torch.sort(expanded_src_token_global_idx).values)
    local_y_expand = pre_combine_data(expanded_src_token_global_idx, num_max_tokens_per_rank, num_topk,
                                      hidden,
                                      world)
    input_for_expand_combine = torch.full((expanded_recv_x_bf16.shape[0] + 1, hidden), float("nan"),
                                          dtype=torch.bfloat16)
    input_for_expand_combine[expanded_handle.recv_src_metadata[:num_recv_tokens, 2:].flatten()] = \
        local_y_expand.view(-1, hidden)
    input_for_expand_combine = input_for_expand_combine[:-1, ...]

    # Do combine
    combine_args = dict(x=input_for_combine, topk_weights=recv_topk_weights, bias=bias, handle=handle,
                        num_sms=num_sms, num_qps=num_qps, async_with_compute_stream=async_with_compute_stream,
                        allocate_on_comm_stream=allocate_on_comm_stream)
    combined_x, combined_topk_weights, _ = launch(buffer, cfg, "combine", with_previous_event,
                                                  async_with_compute_stream, combine_args)
    reduced_combine_args = dict(x=input_for_expand_combine, bias=bias, handle=expanded_handle,
                                num_sms=num_sms,
                                num_qps=num_qps, async_with_compute_stream=async_with_compute_stream,
                                allocate_on_comm_stream=allocate_on_comm_stream)
    # NOTES (DeepEP): expand mode requires `allow_multiple_reduction = True` to support topk_weights
    if cfg.allow_multiple_reduction:
        reduced_combine_args["topk_weights"] = expanded_recv_topk_weights
    reduced_combined_x, reduced_combined_topk_weights, _ = launch(
        buffer, cfg, "combine", with_previous_event, async_with_compute_stream, reduced_combine_args)

    # Checks, in DeepEP's order
    if cfg.version == "2.0":
        assert (topk_idx.data_ptr() != handle.topk_idx.data_ptr()) == do_handle_copy
        assert (topk_idx.data_ptr() != cached_handle.topk_idx.data_ptr()) == do_handle_copy
        assert handle.topk_idx.data_ptr() == cached_handle.topk_idx.data_ptr()
    else:
        assert handle.topk_idx is topk_idx and cached_handle.topk_idx is topk_idx
    assert cached_handle is handle

    if not cfg.do_cpu_sync:
        if use_fp8_dispatch:
            recv_x = (recv_x[0][:num_recv_tokens], recv_x[1][:num_recv_tokens])
            cached_recv_x = (cached_recv_x[0][:num_recv_tokens], cached_recv_x[1][:num_recv_tokens])
        else:
            recv_x, cached_recv_x = recv_x[:num_recv_tokens], cached_recv_x[:num_recv_tokens]
        recv_x_bf16 = recv_x_bf16[:num_recv_tokens]
        recv_topk_idx = recv_topk_idx[:num_recv_tokens]
        recv_topk_weights = recv_topk_weights[:num_recv_tokens]
        cached_recv_topk_idx = cached_recv_topk_idx[:num_recv_tokens]
        handle.recv_src_metadata = handle.recv_src_metadata[:num_recv_tokens]
        expanded_handle.recv_src_metadata = expanded_handle.recv_src_metadata[:num_recv_tokens]

    expanded_indices = expanded_handle.recv_src_metadata[:, 2:]
    expanded_mask = expanded_indices >= 0
    valid_expanded_indices = expanded_indices[expanded_mask]

    if cfg.deterministic:
        recv_x_twice, recv_topk_idx_twice, recv_topk_weights_twice, handle_twice, _ = launch(
            buffer, cfg, "dispatch", with_previous_event, async_with_compute_stream, dict(dispatch_args))
        if not cfg.do_cpu_sync:
            assert num_recv_tokens == handle_twice.psum_num_recv_tokens_per_scaleup_rank[-1].item()
        assert torch.equal(recv_x_bf16, get_recv_x_bf16(recv_x_twice)[:num_recv_tokens])
        assert torch.equal(recv_topk_idx, recv_topk_idx_twice[:num_recv_tokens])
        assert torch.equal(recv_topk_weights, recv_topk_weights_twice[:num_recv_tokens])
        assert torch.equal(handle.recv_src_metadata[:, :1], handle_twice.recv_src_metadata[:num_recv_tokens,
                                                                                           :1])
        expanded_recv_x_twice, _, expanded_recv_topk_weights_twice, _, _ = launch(
            buffer, cfg, "dispatch", with_previous_event, async_with_compute_stream,
            dict(expanded_dispatch_args))
        assert torch.equal(expanded_recv_x_bf16[valid_expanded_indices],
                           get_recv_x_bf16(expanded_recv_x_twice)[valid_expanded_indices])
        if expert_alignment == 1:
            assert torch.equal(expanded_recv_topk_weights, expanded_recv_topk_weights_twice)

    cumulative_local_expert_recv_stats = torch.zeros((num_local_experts,), dtype=torch.int)
    launch(buffer, cfg, "dispatch", with_previous_event, async_with_compute_stream,
           dispatch_args | dict(cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats))

    assert expanded_recv_topk_idx is None
    assert expanded_handle.recv_src_metadata.size(0) == num_recv_tokens
    expanded_safe_indices = expanded_indices.clone()
    expanded_safe_indices[~expanded_mask] = 0

    cached_expanded_recv_x_bf16 = get_recv_x_bf16(cached_expanded_recv_x)
    assert torch.equal(expanded_recv_x_bf16[valid_expanded_indices],
                       cached_expanded_recv_x_bf16[valid_expanded_indices])
    assert torch.equal(expanded_recv_topk_weights[valid_expanded_indices],
                       cached_expanded_recv_topk_weights[valid_expanded_indices])
    for expert_idx in range(num_local_experts):
        start = expanded_handle.psum_num_recv_tokens_per_expert[expert_idx].item()
        end = align(start, expert_alignment)
        assert (cached_expanded_recv_x_bf16[start:end] == 0).all()
        assert (cached_expanded_recv_topk_weights[start:end] == 0).all()

    expanded_recv_x = fold_expanded(expanded_recv_x, expanded_safe_indices, expanded_mask)
    expanded_recv_topk_weights = expanded_recv_topk_weights[expanded_safe_indices]

    if use_fp8_dispatch:
        assert torch.equal(recv_x[0].view(torch.uint8), cached_recv_x[0].view(torch.uint8))
        assert torch.equal(recv_x[1], cached_recv_x[1])
    else:
        assert torch.equal(recv_x, cached_recv_x)
    assert torch.equal(recv_topk_idx, cached_recv_topk_idx)
    assert torch.equal(handle.dst_buffer_slot_idx, cached_handle.dst_buffer_slot_idx)
    assert torch.equal(handle.psum_num_recv_tokens_per_scaleup_rank,
                       cached_handle.psum_num_recv_tokens_per_scaleup_rank)
    assert handle.num_recv_tokens_per_expert_list == cached_handle.num_recv_tokens_per_expert_list

    assert recv_x_bf16.size() == ref_recv_x_bf16.size(), f"{recv_x_bf16.size()=}, {ref_recv_x_bf16.size()=}"
    assert recv_x_bf16.size(0) == num_recv_tokens
    for i in range(num_local_experts if cfg.do_cpu_sync else 0):
        ref_count = (ref_recv_topk_idx == i).sum().item()
        assert ref_count == cumulative_local_expert_recv_stats[i].item()
        assert align(ref_count, expert_alignment) == handle.num_recv_tokens_per_expert_list[i]
    if not cfg.do_cpu_sync:  # DeepEP's stats assertion, on the device counts
        want = [(ref_recv_topk_idx == i).sum().item() for i in range(num_local_experts)]
        assert cumulative_local_expert_recv_stats.tolist() == want
        assert handle.num_recv_tokens_per_expert_list == []
    psum = [0] + handle.psum_num_recv_tokens_per_expert.tolist()
    expanded_psum = [0] + expanded_handle.psum_num_recv_tokens_per_expert.tolist()
    for i in range(num_local_experts):
        ref_count = (ref_recv_topk_idx == i).sum().item()
        assert align(ref_count, expert_alignment) == psum[i + 1] - psum[i]
        assert ref_count == expanded_psum[i + 1] - align(expanded_psum[i], expert_alignment)

    psum_scaleup = [0] + handle.psum_num_recv_tokens_per_scaleup_rank.tolist()
    for i in range(num_scaleup_ranks):
        want = sum(ref_num_recv_tokens_per_rank[i::num_scaleup_ranks])
        assert psum_scaleup[i + 1] - psum_scaleup[i] == want

    for check_recv_x, check_recv_topk_idx, check_recv_topk_weights, check_handle in (
            (expanded_recv_x, None, expanded_recv_topk_weights, expanded_handle),  # Expanded
            (recv_x, recv_topk_idx, recv_topk_weights, handle)):  # Unexpanded
        for i in range(world):
            rank_start_idx = sum(ref_num_recv_tokens_per_rank[:i])
            rank_end_idx = rank_start_idx + ref_num_recv_tokens_per_rank[i]
            sorted_metadata = torch.sort(check_handle.recv_src_metadata[:, 0])
            sorted_indices = sorted_metadata.indices[rank_start_idx:rank_end_idx]
            assert torch.equal(ref_recv_src_token_idx[rank_start_idx:rank_end_idx],
                               sorted_metadata.values[rank_start_idx:rank_end_idx])
            check_list = [(ref_recv_topk_weights, check_recv_topk_weights, True)]
            if check_recv_topk_idx is not None:
                check_list.append((ref_recv_topk_idx, check_recv_topk_idx, False))
            if use_fp8_dispatch:
                check_list.append((ref_recv_x[0].view(torch.uint8), check_recv_x[0].view(torch.uint8), False))
                check_list.append((ref_recv_x[1], check_recv_x[1], False))
            else:
                check_list.append((ref_recv_x, check_recv_x, False))
            ref_mask = ref_recv_topk_idx[rank_start_idx:rank_end_idx] < 0
            for ref_t, got, do_mask in check_list:
                ref_t, got = ref_t[rank_start_idx:rank_end_idx], got[sorted_indices]
                if do_mask:
                    ref_t, got = ref_t.masked_fill(ref_mask, 0), got.masked_fill(ref_mask, 0)
                assert torch.equal(ref_t, got), f"{ref_t=}, {got=}"

    assert torch.equal(combined_x, ref_combined_y), f"Diff: {calc_diff(combined_x, ref_combined_y)}"
    assert torch.equal(reduced_combined_x, ref_reduced_combined_y), \
        f"Diff: {calc_diff(reduced_combined_x, ref_reduced_combined_y)}"
    assert torch.equal(combined_topk_weights, topk_weights)
    if cfg.allow_multiple_reduction:
        assert torch.equal(reduced_combined_topk_weights, topk_weights)


def run_many(rank: int, world: int, configs: dict) -> dict:
    """``{name: cases checked}`` for several configurations in one spawn (a failure names its
    configuration and case)."""
    out = {}
    for name, cfg in configs.items():
        try:
            out[name] = run(rank, world, cfg)
        except Exception as exc:
            raise AssertionError(f"configuration {name!r} ({cfg}) failed on rank {rank}") from exc
    return out
