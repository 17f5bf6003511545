"""DeepEP V2's dispatch and combine, translated onto :class:`flexep.core.Communicator`.

One implementation serves ``ElasticBuffer`` (V2.0) and ``EPBuffer`` (V2.5)
(:mod:`flexep.deepep.elastic`); the versions differ only in argument handling (``do_handle_copy``,
``previous_event_before_epilogue``, ``defer_epilogue``, the handle's ``topk_idx``). Every call:

* **CPU sync** (``do_cpu_sync=True``, DeepEP's default): the core's normal dispatch (flat, or
  hierarchical across nodes), whose one host read sizes the outputs exactly;
* **sync-free** (``do_cpu_sync=False``): the core's sync-free dispatch (no host read at all;
  ``W * T`` output rows, valid counts in the handle's device prefix sums);
* **expanded layout** (``do_expand=True``): the deduplicated receive expanded locally
  (:mod:`flexep.algorithms.expand`), zero bytes extra on the wire;
* **combine**: DeepEP V2's reduction recipe (:class:`~flexep.algorithms.contract.SlotOrder`):
  per-rank partials (the caller's rows, or the expanded rows folded in slot order), a node level
  in hybrid mode with multiple reduction, per-slot values without multiple reduction (expanded).

Received rows are always in ``src_token_global_idx`` order (DeepEP's ``deterministic=True``
order), so ``deterministic`` changes nothing here. Events and streams follow
:mod:`flexep.event` (``async_with_compute_stream`` is DeepEP V1's ``async_finish``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..algorithms.contract import (
    CachedDispatchRequest,
    CombineRequest,
    DispatchRequest,
    SlotOrder,
    SyncFreeCachedRequest,
    SyncFreeCombineRequest,
    SyncFreeDispatchRequest,
)
from ..algorithms.expand import (
    expand_rows,
    expand_weights,
    fold_rows,
    fold_weights,
    plan_expand,
    worst_case_rows,
)
from ..algorithms.packing import position_in_group
from ..core import checks as C
from ..device import device_of
from ..event import EventHandle, EventOverlap
from ..layout import compute_layout
from .handle import EPHandle
from .sizing import combine_buffer_size, dispatch_buffer_size
from .v2_outputs import (
    expert_psums,
    scaleup_psum,
    split_x_v2,
    src_metadata,
    staging_slots,
    tma_col_major,
    unpack_bias,
)

__all__ = ["V2Face", "as_overlap"]


def as_overlap(event) -> Optional[EventOverlap]:
    """A ``previous_event`` as an ``EventOverlap``: V2's ``EventHandle`` (``capture()``) or V1's."""
    if event is None or isinstance(event, EventOverlap):
        return event
    if isinstance(event, EventHandle):
        return EventOverlap(event)
    raise TypeError(f"previous_event must be an EventHandle (buffer.capture()) or EventOverlap, got "
                    f"{type(event).__name__}")


class V2Face:
    """The V2 calls; a subclass sets the attributes its constructor documents (``comm``,
    ``num_max_tokens_per_rank``, ``allow_multiple_reduction``, ...) and ``version``."""

    version = "2.0"

    # ---- events -------------------------------------------------------------------------------
    def _stream_call(self, x, previous_event, before_epilogue, async_, allocate_on_comm_stream):
        if previous_event is not None and not allocate_on_comm_stream:
            raise ValueError("previous_event requires allocate_on_comm_stream=True (as in DeepEP V2)")
        device = device_of(x)
        first = as_overlap(previous_event)
        if before_epilogue is not None:
            # DeepEP waits for it before its second kernel; flexep runs the call as one piece, so
            # it waits for both events first (a valid, more conservative order).
            first = _BothEvents(first or EventOverlap(EventHandle(device)), as_overlap(before_epilogue))
        return self._streams.call(device, first, bool(async_))

    @staticmethod
    def _finish(call, outputs: tuple, defer: bool):
        if not defer:
            return (*outputs, call.event)
        call.event.register_hook_after_wait(lambda: outputs)
        return call.event

    # ---- dispatch -----------------------------------------------------------------------------
    def _dispatch(self, x, topk_idx, topk_weights, cumulative_local_expert_recv_stats, num_experts,
                  num_max_tokens_per_rank, expert_alignment, num_sms, num_qps, previous_event,
                  before_epilogue,
                  async_with_compute_stream, allocate_on_comm_stream, handle, do_handle_copy, do_cpu_sync,
                  do_expand, do_zero_padding, use_tma_aligned_col_major_sf, defer_epilogue):
        self.comm.ensure_alive()
        if defer_epilogue and not async_with_compute_stream:
            raise ValueError("defer_epilogue=True requires async_with_compute_stream=True")
        if do_zero_padding and not do_expand:
            raise ValueError("do_zero_padding=True requires do_expand=True")
        self._check_qps(num_qps)
        call = self._stream_call(x, previous_event, before_epilogue, async_with_compute_stream,
                                 allocate_on_comm_stream)
        with call:
            if handle is not None:
                out = self._cached(x, topk_idx, topk_weights, cumulative_local_expert_recv_stats, num_experts,
                                   num_max_tokens_per_rank, expert_alignment, handle, do_cpu_sync, do_expand,
                                   use_tma_aligned_col_major_sf)
            else:
                out = self._fresh(x, topk_idx, topk_weights, cumulative_local_expert_recv_stats, num_experts,
                                  num_max_tokens_per_rank, expert_alignment, num_sms, do_handle_copy,
                                  do_cpu_sync is None or do_cpu_sync, do_expand, use_tma_aligned_col_major_sf)
            call.keep(x, topk_idx, topk_weights, out[0], out[1], out[2])
        return self._finish(call, out, defer_epilogue)

    def _resolve(self, x, topk_idx, topk_weights, stats, num_experts, capacity, alignment):
        """Checked ``(data, sf, topk_idx, num_experts, T, A)`` of a fresh dispatch."""
        data, sf = split_x_v2(x)
        if sf is None:
            C.check_tensor("x", data, dim=2, dtypes=C.FLOAT_DTYPES)
        else:
            C.split_x((data, sf))
        if topk_idx is None:
            raise ValueError("dispatch without handle needs topk_idx [N, K] (deep_ep.topk_idx_t)")
        if num_experts is None:
            raise ValueError("dispatch without handle needs num_experts")
        C.check_num_experts(num_experts, self.num_ranks)
        topk = C.check_topk_idx(topk_idx, data.size(0), num_experts, values=False, device=data.device)
        if topk_weights is not None:
            C.check_topk_weights(topk_weights, topk)
        capacity = capacity or self.num_max_tokens_per_rank
        C.check_int("num_max_tokens_per_rank", capacity, minimum=1)
        if data.size(0) > capacity:
            raise ValueError(f"x has {data.size(0)} tokens, more than num_max_tokens_per_rank ({capacity})")
        alignment = C.check_int("expert_alignment", 1 if alignment is None else alignment, minimum=1)
        local = num_experts // self.num_ranks
        if stats is not None:
            C.check_tensor("cumulative_local_expert_recv_stats", stats, dim=1, dtypes=(torch.int32,
                                                                                       torch.int64),
                           rows=local, device=data.device)
        self._check_size(capacity, data, sf, topk.size(1))
        return data, sf, topk, num_experts, capacity, alignment

    def _fresh(self, x, topk_idx, topk_weights, stats, num_experts, capacity, alignment, num_sms,
               do_handle_copy, sync, expand, tma):
        ctx: dict = {}

        def checked():
            ctx["args"] = self._resolve(x, topk_idx, topk_weights, stats, num_experts, capacity, alignment)
            return ctx["args"]

        if sync:
            def request() -> DispatchRequest:
                data, sf, topk, e, _, _ = checked()
                lay = compute_layout(topk, e, self.num_ranks, self.topology.ranks_per_node)
                ctx["layout"] = lay
                w = topk_weights if topk_weights is not None else torch.zeros(topk.shape, device=data.device)
                return DispatchRequest(x=data, scales=sf, is_token_in_rank=lay.is_token_in_rank,
                                       num_tokens_per_expert=lay.num_tokens_per_expert, num_experts=e,
                                       topk_idx=topk, topk_weights=w)
            out = self.comm.dispatch(request)
        else:
            def request() -> SyncFreeDispatchRequest:
                data, sf, topk, e, t, _ = checked()
                return SyncFreeDispatchRequest(x=data, topk_idx=topk, num_experts=e, capacity=t, scales=sf,
                                               topk_weights=topk_weights)
            out = self.comm.sync_free_dispatch(request)
        data, sf, topk, num_experts, capacity, alignment = ctx["args"]
        local = num_experts // self.num_ranks
        core = out.handle
        if sync:
            counts = torch.tensor(out.num_recv_tokens_per_expert, dtype=torch.int64, device=data.device)
            aligned = [-(-c // alignment) * alignment for c in out.num_recv_tokens_per_expert]
            per_source = torch.tensor(core.recv_counts, dtype=torch.int64, device=data.device)
            rows = core.num_recv_tokens
            src_rank = torch.repeat_interleave(torch.arange(self.num_ranks, device=data.device), per_source,
                                               output_size=rows)
            src_idx, num_expanded = core.recv_src_idx, sum(aligned)
            base = core.counts[:self.rank_idx].sum(0).to(data.device)  # rows earlier sources fill
            position = position_in_group(ctx["layout"].is_token_in_rank).to(torch.int64)
        else:
            counts, aligned, per_source = core.expert_counts, [], core.recv_counts
            rows = core.num_rows
            src_rank, src_idx = core.recv_src_rank, core.recv_src_idx
            num_expanded = worst_case_rows(rows, topk.size(1), local, alignment)
            offsets = [sum(core.blocks[:self.rank_idx])] * self.num_ranks
            base = torch.tensor(offsets, dtype=torch.int64, device=data.device)
            position = torch.arange(topk.size(0), device=data.device).unsqueeze(1).expand(-1, self.num_ranks)
        plan = plan_expand(out.topk_idx, local, alignment, num_expanded) if expand else None
        if stats is not None:
            stats.add_(counts.to(stats.dtype))
        h = EPHandle(
            do_expand=bool(expand), num_experts=num_experts, expert_alignment=alignment,
            num_max_tokens_per_rank=capacity, num_sms=self._num_sms(num_sms, num_experts, topk.size(1)),
            topk_idx=self._handle_topk(topk_idx, topk, do_handle_copy), num_recv_tokens=rows,
            num_expanded_tokens=num_expanded, num_recv_tokens_per_expert_list=aligned,
            psum_num_recv_tokens_per_scaleup_rank=scaleup_psum(per_source, self.num_scaleup_ranks),
            psum_num_recv_tokens_per_expert=expert_psums(counts, alignment, plan.ends if plan else None),
            num_unaligned_recv_tokens_per_expert=counts.to(torch.int32),
            recv_src_metadata=src_metadata(src_rank, src_idx, out.topk_idx, capacity,
                                           plan.slot_rows if plan else None),
            dst_buffer_slot_idx=staging_slots(topk, local, base, position))
        h.core, h.plan, h.recv_topk_idx, h.owner, h.sync_free = core, plan, out.topk_idx, self, not sync
        if self.version != "2.0":
            h.track_version()
        return self._outputs(h, out.x, out.scales, out.topk_idx, out.topk_weights if topk_weights is not None
                             else None, expand, tma)

    def _outputs(self, h: EPHandle, x, sf, recv_idx, recv_w, expand: bool, tma: bool) -> tuple:
        """``(recv_x, recv_topk_idx, recv_topk_weights, handle)`` in the requested layout."""
        if expand:
            plan = h.plan if h.plan is not None else plan_expand(h.recv_topk_idx,
                                                                 h.num_experts // self.num_ranks,
                                                                 h.expert_alignment, h.num_expanded_tokens)
            x = expand_rows(x, plan)
            sf = expand_rows(sf, plan) if sf is not None else None
            recv_w = expand_weights(recv_w, plan) if recv_w is not None else None
            recv_idx = None
        if sf is not None and tma:
            sf = tma_col_major(sf)
        return (x if sf is None else (x, sf)), recv_idx, recv_w, h

    def _cached(self, x, topk_idx, topk_weights, stats, num_experts, capacity, alignment, handle, do_cpu_sync,
                expand, tma):
        def validate() -> tuple:
            if not isinstance(handle, EPHandle) or handle.owner is not self:
                raise ValueError("handle must be an EPHandle returned by this buffer's dispatch")
            if topk_idx is not None:
                raise ValueError("cached dispatch (handle=...) takes no topk_idx (the handle's routing "
                                 "is used)")
            if do_cpu_sync:
                raise ValueError("cached dispatch (handle=...) cannot sync with the CPU: pass "
                                 "do_cpu_sync=None or False")
            if stats is not None:
                raise ValueError("cached dispatch does not count expert tokens: pass "
                                 "cumulative_local_expert_recv_stats=None")
            for name, value, want in (("num_experts", num_experts, handle.num_experts),
                                      ("num_max_tokens_per_rank", capacity, handle.num_max_tokens_per_rank),
                                      ("expert_alignment", alignment, handle.expert_alignment)):
                if value is not None and value != want:
                    raise ValueError(f"{name} ({value}) must equal the handle's ({want}) in a cached "
                                     "dispatch")
            data, sf = split_x_v2(x)
            if sf is not None:
                C.split_x((data, sf))
            if topk_weights is not None:
                C.check_topk_weights(topk_weights, handle.topk_idx)
            return data, sf

        ctx: dict = {}
        core = handle.core if isinstance(handle, EPHandle) else None
        if isinstance(handle, EPHandle) and handle.sync_free:
            def request() -> SyncFreeCachedRequest:
                ctx["x"] = validate()
                return SyncFreeCachedRequest(x=ctx["x"][0], handle=core, scales=ctx["x"][1],
                                             topk_weights=topk_weights)
            out = self.comm.sync_free_cached_dispatch(request)
            weights = out.topk_weights
        else:
            def request() -> CachedDispatchRequest:
                ctx["x"] = validate()
                return CachedDispatchRequest(x=ctx["x"][0], handle=core, scales=ctx["x"][1])
            out = self.comm.cached_dispatch(request)
            weights = None
            if topk_weights is not None:  # the weights ride the same routing as float32 rows
                weights = self.comm.cached_dispatch(CachedDispatchRequest(x=topk_weights.contiguous(),
                                                                          handle=core)).x
        recv_idx = handle.recv_topk_idx
        if weights is not None:
            weights = torch.where(recv_idx >= 0, weights, 0.0)
        return self._outputs(handle, out.x, out.scales, recv_idx.clone(), weights, expand, tma)

    # ---- combine ------------------------------------------------------------------------------
    def _combine(self, x, handle, topk_weights, bias, num_qps, previous_event, before_epilogue,
                 async_with_compute_stream, allocate_on_comm_stream, defer_epilogue):
        self.comm.ensure_alive()
        if defer_epilogue and not async_with_compute_stream:
            raise ValueError("defer_epilogue=True requires async_with_compute_stream=True")
        self._check_qps(num_qps)
        call = self._stream_call(x, previous_event, before_epilogue, async_with_compute_stream,
                                 allocate_on_comm_stream)
        ctx: dict = {}

        def request():
            if not isinstance(handle, EPHandle) or handle.owner is not self:
                raise ValueError("handle must be an EPHandle returned by this buffer's dispatch")
            C.check_tensor("x", x, dim=2, dtypes=C.FLOAT_DTYPES)
            biases = unpack_bias(bias)
            rows, weights, order = self._combine_rows(x, handle, topk_weights)
            self._check_combine_size(handle, x)
            ctx["handle"] = handle
            if handle.sync_free:
                return SyncFreeCombineRequest(x=rows, handle=handle.core, slot_order=order,
                                              topk_weights=weights,
                                              bias=biases)
            return CombineRequest(x=rows, handle=handle.core, topk_weights=weights, bias=biases,
                                  slot_order=order)

        with call:
            sync_free = isinstance(handle, EPHandle) and handle.sync_free
            out = self.comm.sync_free_combine(request) if sync_free else self.comm.combine(request)
            call.keep(x, topk_weights, out.x, out.topk_weights)
        return self._finish(call, (out.x, out.topk_weights), defer_epilogue)

    def _combine_rows(self, x, handle: EPHandle, topk_weights):
        """Rows to return and the recipe (see the module docstring)."""
        amr = self.allow_multiple_reduction
        node = amr and self.allow_hybrid_mode and self.num_scaleout_ranks > 1
        k = handle.topk_idx.size(1)
        if handle.do_expand:
            plan = handle.plan
            if x.size(0) < plan.num_rows:
                raise ValueError(f"x must have the {plan.num_rows} expanded rows of the handle, got "
                                 f"{tuple(x.shape)}")
            if topk_weights is not None:
                C.check_tensor("topk_weights", topk_weights, dim=1, dtypes=(torch.float32,), rows=x.size(0),
                               device=x.device)
            rows = fold_rows(x, plan, per_slot=not amr)
            weights = fold_weights(topk_weights, plan) if topk_weights is not None else None
        else:
            rows, weights = x, topk_weights
            if weights is not None:
                C.check_tensor("topk_weights", weights, dim=2, dtypes=(torch.float32,), rows=x.size(0),
                               device=x.device)
                if weights.size(1) != k:
                    raise ValueError(f"topk_weights must be [{x.size(0)}, {k}], got {tuple(weights.shape)}")
        order = SlotOrder(topk_idx=handle.topk_idx, num_experts=handle.num_experts,
                          ranks_per_node=self.num_scaleup_ranks if node else 0,
                          per_slot=handle.do_expand and not amr)
        return rows, weights, order

    # ---- checks and small helpers --------------------------------------------------------------
    def _handle_topk(self, given: torch.Tensor, topk: torch.Tensor, do_handle_copy: bool) -> torch.Tensor:
        if self.version == "2.0" and do_handle_copy:
            return topk.clone()
        return given if given.dtype == torch.int64 else topk

    def _num_sms(self, num_sms: int, num_experts: int, num_topk: int) -> int:
        if num_sms:
            return num_sms + num_sms % 2 if self.version != "2.0" else num_sms
        return self.get_theoretical_num_sms(num_experts, num_topk)

    def _check_qps(self, num_qps: int) -> None:
        C.check_int("num_qps", num_qps, minimum=0)
        if num_qps > self.num_allocated_qps:
            raise ValueError(f"num_qps ({num_qps}) exceeds num_allocated_qps ({self.num_allocated_qps})")

    def _check_size(self, capacity: int, data: torch.Tensor, sf, num_topk: int) -> None:
        """DeepEP checks each call against the buffer size: same check, same numbers."""
        need = dispatch_buffer_size(self.num_ranks, self.num_nvlink_ranks, capacity, data.size(1), num_topk,
                                    sf is not None, self.allow_hybrid_mode)
        if need > self.num_bytes:
            raise ValueError(f"this dispatch (num_max_tokens_per_rank={capacity}, hidden={data.size(1)}, "
                             f"top-{num_topk}) needs {need} bytes of buffer, more than "
                             f"num_bytes={self.num_bytes}; "
                             "build the buffer with get_buffer_size_hint(...) for the largest call")

    def _check_combine_size(self, handle: EPHandle, x: torch.Tensor) -> None:
        need = combine_buffer_size(self.num_ranks, self.num_nvlink_ranks, handle.num_max_tokens_per_rank,
                                   x.size(1), handle.topk_idx.size(1), self.allow_hybrid_mode,
                                   self.allow_multiple_reduction)
        if need > self.num_bytes:
            raise ValueError(f"this combine (hidden={x.size(1)}) needs {need} bytes of buffer, more than "
                             f"num_bytes={self.num_bytes}; build the buffer with get_buffer_size_hint(...)")


class _BothEvents:
    """Two events to wait for, shaped like an ``EventOverlap`` for :class:`~flexep.event.StreamCall`."""

    def __init__(self, first: EventOverlap, second: EventOverlap) -> None:
        self.event = self
        self._events = [e.event for e in (first, second) if e.event is not None]

    def stream_wait(self, stream) -> None:
        for e in self._events:
            e.stream_wait(stream)
