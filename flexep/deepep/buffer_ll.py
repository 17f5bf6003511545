"""The low-latency (decode) and shrink-mode methods of DeepEP V1's ``Buffer``.

A mixin of :class:`flexep.deepep.buffer.Buffer`, split out of it by mode; it translates DeepEP's
calling convention into :class:`flexep.core.LLDispatchRequest`/``LLCombineRequest``.

Differences from DeepEP (``docs/low-latency.md``): buffers are reused only once nothing holds
them (any number of results may be held; no cleaning between normal and low-latency calls),
``dispatch_wait_recv_cost_stats``/``combine_wait_recv_cost_stats`` are accepted and left
unchanged (a collective cannot attribute waiting to one source), the receive buffer that
``get_next_low_latency_combine_buffer`` returns is contiguous, LogFMT rows have one fixed size,
and shrink mode exchanges through the store.

Shape legend: :mod:`flexep.algorithms.contract` (Q = ``num_max_dispatch_tokens_per_rank``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..algorithms.contract import LLCombineRequest, LLDispatchRequest, LowLatencyHandle
from ..algorithms.low_latency import aligned, rdma_size_hint
from ..core import checks as C
from ..device import device_of
from ..errors import CapacityError

__all__ = ["LowLatencyMethods"]


class LowLatencyMethods:
    """DeepEP V1's low-latency API on ``self.comm`` (a :class:`flexep.core.Communicator`)."""

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                       num_ranks: int, num_experts: int) -> int:
        """DeepEP's minimum ``num_rdma_bytes`` for LL mode, same formula (``num_ranks`` unused).

        Example: ``(128, 7168, 8, 256) -> 1_908_410_496``.
        """
        for name, value in (("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank),
                            ("hidden", hidden), ("num_ranks", num_ranks), ("num_experts", num_experts)):
            C.check_int(name, value, minimum=1)
        return rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    # ---- low-latency mode ------------------------------------------------------------------
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int,
                                 num_experts: int) -> None:
        """DeepEP's reset of the LL signalling buffers: nothing to reset here, so it checks its
        arguments and acts as a barrier (collective)."""
        self._require_low_latency("clean_low_latency_buffer")
        error = None
        try:
            C.check_int("hidden", hidden, minimum=1)
            self._check_ll_size(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        except (TypeError, ValueError) as exc:
            error = exc
        if self.comm.shrink:  # DeepEP's shrink barrier: silent peers are masked, not waited for
            if error is not None:
                raise error
            self.comm.shrink_barrier()
            return
        self.comm.barrier("ll_clean", error, **({} if error else dict(
            capacity=num_max_dispatch_tokens_per_rank, hidden=hidden, num_experts=num_experts)))

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor,
                             num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False):
        """Send each token to the experts it chose, into a fixed-capacity per-expert layout.

        ``x: [T, H]`` bf16 (``T <= Q``), ``topk_idx: [T, K] int64``. Returns ``(recv_x, recv_count
        [L] int32, handle, event, hook)``: ``recv_x`` is ``[L, W*Q, H]`` in x's dtype, or with
        ``use_fp8`` ``(e4m3 [L, W*Q, H], scales [L, W*Q, H/128] float32 or [L, W*Q, H/512] int32)``
        with the token dimension contiguous; slots ``[0, recv_count[l])`` are valid, each
        source's tokens one contiguous block in rank order. ``handle`` reads as DeepEP's 5-tuple.
        With ``return_recv_hook`` the call returns after sending and ``hook()`` receives.
        """
        self._require_low_latency("low_latency_dispatch")

        def request() -> LLDispatchRequest:
            self._check_hook_flags(async_finish, return_recv_hook)
            C.check_tensor("x", x, dim=2, dtypes=C.FLOAT_DTYPES)
            C.check_num_experts(num_experts, self.group_size)
            self._check_ll_size(num_max_dispatch_tokens_per_rank, x.size(1), num_experts)
            if x.size(0) > num_max_dispatch_tokens_per_rank:
                raise CapacityError(
                    f"x has {x.size(0)} tokens, more than num_max_dispatch_tokens_per_rank "
                    f"({num_max_dispatch_tokens_per_rank}); raise num_max_dispatch_tokens_per_rank "
                    "(equal on all ranks) or split the batch", op="low_latency_dispatch")
            if dispatch_wait_recv_cost_stats is not None:
                C.check_tensor("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, dim=1,
                               dtypes=(torch.int64,), rows=self.group_size)
            return LLDispatchRequest(
                x=x, topk_idx=C.check_topk_idx(topk_idx, x.size(0), num_experts, values=False,
                                               device=x.device),
                capacity=num_max_dispatch_tokens_per_rank, num_experts=num_experts, use_fp8=use_fp8,
                round_scale=round_scale, use_ue8m0=use_ue8m0,
                cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats)
        with self._call(device_of(x), None, async_finish) as call:
            pending, handle = self.comm.ll_dispatch(request)
            if not return_recv_hook:
                pending.finish()
            recv_x = pending.out.recv_x()
            call.keep(x, topk_idx, pending.out.recv_count, recv_x)
        hook = pending.finish if return_recv_hook else None
        return recv_x, pending.out.recv_count, handle, call.event, hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None):
        """Weighted sum of each token's expert outputs, back on the token's rank.

        ``x: [L, W*Q, H]`` expert outputs in the dispatch's slots (only valid slots are read;
        with ``zero_copy`` :meth:`get_next_low_latency_combine_buffer` is read instead),
        ``topk_idx``/``topk_weights [T, K]`` the dispatched routing and its weights. Returns
        ``(combined_x [T, H] = sum_k w[t, k] * y(e_k, t), float32 accumulation; event; hook)``.
        """
        self._require_low_latency("low_latency_combine")

        def request() -> LLCombineRequest:
            if use_logfmt and zero_copy:
                raise ValueError("use_logfmt=True and zero_copy=True are mutually exclusive (as in DeepEP): "
                                 "pass the expert outputs as x to combine with LogFMT")
            self._check_hook_flags(async_finish, return_recv_hook)
            _check_ll_handle(handle)
            self.comm.check_ll_handle(handle)
            C.check_tensor("x", x, dim=3, dtypes=C.FLOAT_DTYPES, contiguous=not zero_copy)
            shape = (handle.num_local_experts, handle.num_ranks * handle.num_max_dispatch_tokens_per_rank,
                     handle.hidden)
            if tuple(x.shape) != shape:
                raise ValueError(f"x must be {list(shape)} (the dispatch's [L, W*M, H]), got {list(x.shape)}")
            C.check_topk_idx(topk_idx, handle.num_tokens, handle.num_experts, values=False)
            if topk_idx.shape != handle.topk_idx.shape or (self.comm._validate_now(topk_idx) and not
                                                            torch.equal(topk_idx.long(), handle.topk_idx)):
                raise ValueError("topk_idx must be the routing this rank dispatched with (the handle's "
                                 f"{list(handle.topk_idx.shape)} topk_idx), got a different one")
            if combine_wait_recv_cost_stats is not None:
                C.check_tensor("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, dim=1,
                               dtypes=(torch.int64,), rows=self.group_size)
            source = self._zero_copy_source(handle, x) if zero_copy else aligned(x)
            dest = out if out is not None else torch.empty(handle.num_tokens, handle.hidden, dtype=x.dtype,
                                                           device=x.device)
            return LLCombineRequest(x=source, topk_weights=topk_weights, handle=handle, out=dest,
                                    use_logfmt=bool(use_logfmt))
        with self._call(device_of(x), None, async_finish) as call:
            pending = self.comm.ll_combine(request)
            if not return_recv_hook:
                pending.finish()
            call.keep(x, topk_idx, topk_weights, pending.out)
        return pending.out, call.event, pending.finish if return_recv_hook else None

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The ``[L, W*Q, H]`` bf16 tensor ``low_latency_combine(..., zero_copy=True)`` reads.

        Write the expert outputs into it (the handle's slot layout) instead of passing them as
        ``x``. It is contiguous, kept by this ``Buffer`` and reused for every handle of the same
        shape; combine has read it by the time it returns, so it may be refilled right after.
        """
        self._require_low_latency("get_next_low_latency_combine_buffer")
        _check_ll_handle(handle)
        self.comm.check_ll_handle(handle)
        shape = (handle.num_local_experts, handle.num_ranks * handle.num_max_dispatch_tokens_per_rank,
                 handle.hidden)
        device, buf = handle.recv_src_info.device, self._ll_combine_buffer
        if buf is None or tuple(buf.shape) != shape or buf.device != device:
            buf = self._ll_combine_buffer = torch.empty(shape, dtype=torch.bfloat16, device=device)
        return buf

    def _zero_copy_source(self, handle: LowLatencyHandle, x: torch.Tensor) -> torch.Tensor:
        buf = self._ll_combine_buffer
        if buf is None or buf.shape != x.shape or buf.device != x.device:
            raise ValueError("zero_copy=True reads get_next_low_latency_combine_buffer(handle): call it "
                             "and write the expert outputs into it first")
        return buf

    # ---- shrink mode (DeepEP's mask buffer) --------------------------------------------------
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (``mask=True``) or unmask (the default, as DeepEP) ``rank_to_mask`` on this rank
        only: a masked rank is neither sent to nor waited for by this rank's low-latency calls."""
        link = self._shrink_link("low_latency_update_mask_buffer")
        C.check_int("rank_to_mask", rank_to_mask, minimum=0)
        if rank_to_mask >= self.group_size:
            raise ValueError(f"rank_to_mask must be in [0, {self.group_size}), got {rank_to_mask}")
        link.update(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Copy this rank's mask into ``mask_status: [num_ranks] int32`` (1 = masked)."""
        link = self._shrink_link("low_latency_query_mask_buffer")
        C.check_tensor("mask_status", mask_status, dtypes=(torch.int32,), contiguous=True)
        if mask_status.numel() != self.group_size:
            raise ValueError(f"mask_status must have {self.group_size} elements (one per rank), got "
                             f"{mask_status.numel()}")
        mask_status.view(-1).copy_(link.mask)

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmask every rank (this rank's mask only)."""
        self._shrink_link("low_latency_clean_mask_buffer").clear()

    def _shrink_link(self, what: str):
        self.comm.ensure_alive()
        if not self.comm.shrink:
            raise RuntimeError(f"{what} needs a Buffer created with enable_shrink=True")
        return self.comm.low_latency.link

    def _require_low_latency(self, what: str) -> None:
        self.comm.ensure_alive()
        if not self.low_latency_mode:
            raise ValueError(f"{what} needs a Buffer created with low_latency_mode=True "
                             "(this one has low_latency_mode=False)")

    @staticmethod
    def _check_hook_flags(async_finish: bool, return_recv_hook: bool) -> None:
        if async_finish and return_recv_hook:
            raise ValueError("async_finish=True and return_recv_hook=True are mutually exclusive")

    def _check_ll_size(self, capacity: int, hidden: int, num_experts: int) -> None:
        """Capacity and ``num_rdma_bytes`` against DeepEP's size hint (never truncate)."""
        C.check_int("num_max_dispatch_tokens_per_rank", capacity, minimum=1)
        C.check_num_experts(num_experts, self.group_size)
        need = rdma_size_hint(capacity, hidden, self.group_size, num_experts)
        if self.num_rdma_bytes < need:
            raise CapacityError(
                f"num_rdma_bytes ({self.num_rdma_bytes}) is smaller than the {need} bytes low-latency "
                f"mode needs for num_max_dispatch_tokens_per_rank={capacity}, hidden={hidden}, "
                f"num_experts={num_experts}; create the Buffer with num_rdma_bytes="
                "Buffer.get_low_latency_rdma_size_hint(...)", op="low_latency")


def _check_ll_handle(handle) -> None:
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError("handle must be the handle returned by Buffer.low_latency_dispatch, got "
                        f"{type(handle).__name__}")
