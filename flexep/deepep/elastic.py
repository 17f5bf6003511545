"""DeepEP V2's buffers on flexep: ``ElasticBuffer`` (V2.0) and ``EPBuffer`` (V2.5).

``import flexep as deep_ep`` (or the ``deep_ep`` shim) gives both, next to V1's ``Buffer``. They
share one implementation (:class:`~flexep.deepep.v2_face.V2Face`) over the core communicator
and differ as DeepEP's versions do:

* constructor: V2.0 accepts ``num_cpu_bytes`` (unused); V2.5 takes
  ``lb_allocation_plan_or_num_bytes`` (the load-balancing storage);
* ``dispatch``/``combine``: V2.0 has ``previous_event_before_epilogue``; V2.5 has
  ``defer_epilogue`` (the call returns only the event; its first wait returns the outputs);
* ``do_handle_copy``: V2.0 defaults to True (the handle keeps a copy of ``topk_idx``); V2.5
  requires False (the handle keeps the caller's tensor and checks it was not modified);
* an explicit ``num_sms`` is kept (V2.0) or rounded up to even (V2.5);
* ``barrier(use_comm_stream=...)`` (V2.0) vs ``barrier(wait_comm_stream=...)`` (V2.5);
* V2.5 adds ``lb_prefetch_weights`` and ``lb_reduce_grads``.

Hardware knobs (``sl_idx``, ``num_gpu_timeout_secs``, ``prefer_overlap_with_compute``,
``num_sms``, ``num_qps``) are accepted and checked as DeepEP checks them; they change no result.
``num_cpu_timeout_secs`` bounds every call (flexep's ``timeout``). flexep's own options are
keyword-only (``ranks_per_node``, ``num_channels``, ``timeout``, ``check_consistency``,
``validate``, ``verify``, and ``num_experts``: when known at construction the first dispatch
also makes a single host read).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from ..algorithms.load_balance import lb_prefetch, lb_reduce
from ..core import checks as C
from ..core.communicator import Communicator, Options
from ..device import group_carries
from ..event import CommStreams, EventHandle, EventOverlap
from . import sizing
from .allocator import BufferAllocator, BufferBase, Runtime
from .v2_face import V2Face, as_overlap

__all__ = ["ElasticBuffer", "EPBuffer"]

_FLEXEP_KW = ("ranks_per_node", "num_channels", "timeout", "check_consistency", "validate", "verify",
              "num_experts", "_fault_hook")


class _Base(V2Face):
    """Construction shared by both versions (collective over ``group``)."""

    def _build(self, group, label: str, num_bytes, num_max_tokens_per_rank, hidden, num_topk,
               use_fp8_dispatch,
               deterministic, allow_hybrid_mode, allow_multiple_reduction, prefer_overlap_with_compute,
               num_allocated_qps, num_cpu_timeout_secs, explicitly_destroy, error, flexep: dict) -> None:
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
        unknown = set(flexep) - set(_FLEXEP_KW)
        if unknown:
            raise TypeError(f"{label}() got unexpected keyword arguments {sorted(unknown)}")
        num_experts = flexep.get("num_experts")
        try:
            for name, v in (("num_max_tokens_per_rank", num_max_tokens_per_rank), ("hidden", hidden),
                            ("num_topk", num_topk), ("num_allocated_qps", num_allocated_qps)):
                C.check_int(name, v, minimum=0)
            if num_bytes is None:
                sizing._check_shape(num_max_tokens_per_rank, hidden)
            else:
                C.check_int("num_bytes", num_bytes, minimum=1, multiple=sizing.ALLOCATION_ALIGNMENT)
            if num_experts is not None:
                C.check_num_experts(num_experts, group.size())
        except (TypeError, ValueError) as exc:
            error = error or exc
        self.group, self.rank_idx, self.num_ranks = group, group.rank(), group.size()
        self.allow_hybrid_mode = bool(allow_hybrid_mode)
        self.allow_multiple_reduction = bool(allow_multiple_reduction)
        self.prefer_overlap_with_compute = bool(prefer_overlap_with_compute)
        self.deterministic = bool(deterministic)
        self.explicitly_destroy, self.nccl_comm_handle = bool(explicitly_destroy), None
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        timeout = flexep.get("timeout", num_cpu_timeout_secs)
        options = Options(ranks_per_node=flexep.get("ranks_per_node"), hierarchical=self.allow_hybrid_mode,
                          num_channels=flexep.get("num_channels"), timeout=timeout,
                          check_consistency=flexep.get("check_consistency",
                                                       True), validate=flexep.get("validate"),
                          verify=flexep.get("verify"))
        agree = dict(num_max_tokens_per_rank=num_max_tokens_per_rank, hidden=hidden, num_topk=num_topk,
                     use_fp8_dispatch=int(bool(use_fp8_dispatch)),
                     allow_multiple_reduction=int(allow_multiple_reduction),
                     num_bytes=-1 if num_bytes is None else num_bytes, num_experts=num_experts or 0)
        self.comm = Communicator(group, options, agree=agree, error=error, label=label,
                                 fault_hook=flexep.get("_fault_hook"))
        self.topology = self.comm.topology
        self.num_rdma_ranks, self.num_nvlink_ranks = sizing.get_physical_domain_size(self)
        self.num_scaleout_ranks, self.num_scaleup_ranks = sizing.get_logical_domain_size(self)
        self.scaleout_rank_idx = self.rank_idx // self.num_scaleup_ranks
        self.scaleup_rank_idx = self.rank_idx % self.num_scaleup_ranks
        self.num_allocated_qps = num_allocated_qps or (129 if self.num_scaleout_ranks > 1 else 17)
        if num_bytes is None:
            num_bytes = sizing.calculate_buffer_size(self.num_ranks, self.num_nvlink_ranks,
                                                     num_max_tokens_per_rank,
                                                     hidden, num_topk, use_fp8_dispatch,
                                                     self.allow_hybrid_mode,
                                                     self.allow_multiple_reduction)
        self.num_bytes = num_bytes
        if num_experts:  # the per-expert counts ride the first dispatch's control round too
            self.comm.control.per_dest_width = max(self.comm.control.per_dest_width,
                                                   num_experts // self.num_ranks)
        self._streams = CommStreams()

    # ---- DeepEP's helpers --------------------------------------------------------------------
    @staticmethod
    def get_buffer_size_hint(group: dist.ProcessGroup, num_max_tokens_per_rank: int, hidden: int,
                             num_topk: int = 0, use_fp8_dispatch: bool = False,
                             allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        """DeepEP's buffer size for this MoE shape (see :mod:`flexep.deepep.sizing`)."""
        return sizing.get_buffer_size_hint(group, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch,
                                           allow_hybrid_mode, allow_multiple_reduction)

    @staticmethod
    def capture() -> EventHandle:
        """An event on the current stream (pass it as ``previous_event``)."""
        return EventHandle()

    def get_comm_stream(self):
        """The communication stream of this process's accelerator (None without streams)."""
        return self._streams.get(EventHandle().device)

    def get_physical_domain_size(self) -> tuple[int, int]:
        """``(num_rdma_ranks, num_nvlink_ranks)``: nodes and ranks per node."""
        return self.num_rdma_ranks, self.num_nvlink_ranks

    def get_logical_domain_size(self, allow_hybrid_mode: Optional[bool] = None) -> tuple[int, int]:
        """``(num_scaleout_ranks, num_scaleup_ranks)`` of this buffer (or for another mode)."""
        return sizing.get_logical_domain_size(self, allow_hybrid_mode)

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int, num_scaleout_topk: int = 0,
                                rdma_gbs: float = 0, nvlink_gbs: float = 0, sm_read_gbs: float = 0,
                                sm_write_gbs: float = 0) -> int:
        """A positive even SM count (a hint; no result depends on it)."""
        return sizing.theoretical_num_sms(self.num_ranks, num_experts, num_topk,
                                          self.prefer_overlap_with_compute,
                                          4 if self.version != "2.0" else 2)

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        """DeepEP's queue-pair hint for ``num_sms``."""
        return sizing.theoretical_num_qps(num_sms, self.num_scaleout_ranks > 1, self.num_allocated_qps)

    @property
    def last_traffic(self):
        """Bytes the last call on this rank sent per link class, next to the routing's minimum."""
        return self.comm.last_traffic

    def _barrier(self, with_cpu_sync: bool) -> None:
        self.comm.barrier("barrier")

    def _destroy(self) -> None:
        if not self.explicitly_destroy:
            raise RuntimeError(f"destroy() needs {type(self).__name__}(..., explicitly_destroy=True)")
        self.comm.destroy()
        self.runtime = None


class ElasticBuffer(_Base):
    """DeepEP V2.0's ``ElasticBuffer`` (see the module docstring; arguments in DeepEP's order)."""

    version = "2.0"

    def __init__(self, group: dist.ProcessGroup, num_bytes: Optional[int] = None, num_cpu_bytes: int = 0,
                 num_max_tokens_per_rank: int = 0, hidden: int = 0, num_topk: int = 0,
                 use_fp8_dispatch: bool = False, deterministic: bool = False, allow_hybrid_mode: bool = True,
                 allow_multiple_reduction: bool = True, prefer_overlap_with_compute: bool = True,
                 sl_idx: int = 3,
                 num_allocated_qps: int = 0, num_cpu_timeout_secs: int = 300, num_gpu_timeout_secs: int = 100,
                 explicitly_destroy: bool = False, **flexep) -> None:
        error = None
        try:
            C.check_int("num_cpu_bytes", num_cpu_bytes, minimum=0, multiple=sizing.ALLOCATION_ALIGNMENT)
            if num_cpu_bytes and (num_bytes is None or num_cpu_bytes > num_bytes):
                raise ValueError("num_cpu_bytes > 0 needs num_bytes given and >= num_cpu_bytes")
        except (TypeError, ValueError) as exc:
            error = exc
        self.num_cpu_bytes, self.sl_idx = num_cpu_bytes, sl_idx
        self._build(group, "ElasticBuffer", num_bytes, num_max_tokens_per_rank, hidden, num_topk,
                    use_fp8_dispatch,
                    deterministic, allow_hybrid_mode, allow_multiple_reduction, prefer_overlap_with_compute,
                    num_allocated_qps, num_cpu_timeout_secs, explicitly_destroy, error, flexep)
        self.runtime = Runtime(lb_storage=None, comm=self.comm)

    def destroy(self) -> None:
        """Release the buffer (requires ``explicitly_destroy=True``)."""
        self._destroy()

    def barrier(self, use_comm_stream: bool = True, with_cpu_sync: bool = False,
                sequential: bool = True) -> None:
        """A collective barrier (every rank must call it)."""
        self._barrier(with_cpu_sync)

    def dispatch(self, x, topk_idx: Optional[torch.Tensor] = None,
                 topk_weights: Optional[torch.Tensor] = None,
                 cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                 num_experts: Optional[int] = None,
                 num_max_tokens_per_rank: Optional[int] = None, expert_alignment: Optional[int] = None,
                 num_sms: int = 0, num_qps: int = 0, previous_event=None, previous_event_before_epilogue=None,
                 async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False, handle=None,
                 do_handle_copy: bool = True, do_cpu_sync: Optional[bool] = None, do_expand: bool = False,
                 do_zero_padding: bool = False, use_tma_aligned_col_major_sf: bool = False):
        """Send each token to the ranks of its experts. Returns ``(recv_x, recv_topk_idx,
        recv_topk_weights, handle, event)``; see :mod:`flexep.deepep.v2_face` and
        ``docs/deepep-v2.md`` for every argument and layout."""
        return self._dispatch(x, topk_idx, topk_weights, cumulative_local_expert_recv_stats, num_experts,
                              num_max_tokens_per_rank, expert_alignment, num_sms, num_qps, previous_event,
                              previous_event_before_epilogue, async_with_compute_stream,
                              allocate_on_comm_stream,
                              handle, do_handle_copy, do_cpu_sync, do_expand, do_zero_padding,
                              use_tma_aligned_col_major_sf, False)

    def combine(self, x: torch.Tensor, handle, topk_weights: Optional[torch.Tensor] = None, bias=None,
                num_sms: int = 0, num_qps: int = 0, previous_event=None, previous_event_before_epilogue=None,
                async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False):
        """Return every row to its token's rank and sum (unweighted, DeepEP V2's recipe).
        Returns ``(combined_x [N, H], combined_topk_weights [N, K] or None, event)``."""
        return self._combine(x, handle, topk_weights, bias, num_qps, previous_event,
                             previous_event_before_epilogue, async_with_compute_stream,
                             allocate_on_comm_stream,
                             False)


class EPBuffer(BufferBase, _Base):
    """DeepEP V2.5's ``EPBuffer`` (see the module docstring; arguments in DeepEP's order)."""

    version = "2.5"

    def __init__(self, group: dist.ProcessGroup, num_bytes: Optional[int] = None,
                 num_max_tokens_per_rank: int = 0,
                 hidden: int = 0, num_topk: int = 0, use_fp8_dispatch: bool = False,
                 lb_allocation_plan_or_num_bytes: Union[BufferAllocator,
                                                        int] = 0, deterministic: bool = False,
                 allow_hybrid_mode: bool = True, allow_multiple_reduction: bool = True,
                 prefer_overlap_with_compute: bool = True, sl_idx: Optional[int] = None,
                 num_allocated_qps: int = 0,
                 num_cpu_timeout_secs: int = 300, num_gpu_timeout_secs: int = 100,
                 explicitly_destroy: bool = False,
                 **flexep) -> None:
        BufferBase.__init__(self, explicitly_destroy)
        error, plan, lb_bytes = None, None, 0
        try:
            if isinstance(lb_allocation_plan_or_num_bytes, BufferAllocator):
                plan = lb_allocation_plan_or_num_bytes
                if plan.materialized:
                    raise ValueError("lb_allocation_plan_or_num_bytes: the plan is already materialized")
                lb_bytes = plan.num_bytes
            else:
                lb_bytes = C.check_int("lb_allocation_plan_or_num_bytes", lb_allocation_plan_or_num_bytes,
                                       minimum=0, multiple=sizing.ALLOCATION_ALIGNMENT)
        except (TypeError, ValueError) as exc:
            error = exc
        self.sl_idx, self.num_lb_bytes = sl_idx, lb_bytes
        self._build(group, "EPBuffer", num_bytes, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch,
                    deterministic, allow_hybrid_mode, allow_multiple_reduction, prefer_overlap_with_compute,
                    num_allocated_qps, num_cpu_timeout_secs, explicitly_destroy, error, flexep)
        storage = None
        if lb_bytes:
            storage = torch.zeros(lb_bytes, dtype=torch.uint8, device=_group_device(self.comm.group))
            if plan is not None:
                plan.materialize(storage)
        self.runtime = Runtime(lb_storage=storage, comm=self.comm)
        self.context = self.comm

    def destroy(self) -> None:
        """Release the buffer (requires ``explicitly_destroy=True``)."""
        self._destroy()
        self.context = None

    def barrier(self, wait_comm_stream: bool = True, with_cpu_sync: bool = False, sequential: bool = True,
                context_idx: Optional[int] = None) -> None:
        """A collective barrier (every rank must call it)."""
        self._barrier(with_cpu_sync)

    def dispatch(self, x, topk_idx: Optional[torch.Tensor] = None,
                 topk_weights: Optional[torch.Tensor] = None,
                 cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                 num_experts: Optional[int] = None,
                 num_max_tokens_per_rank: Optional[int] = None, expert_alignment: Optional[int] = None,
                 num_sms: int = 0, num_qps: int = 0, previous_event=None,
                 async_with_compute_stream: bool = False,
                 allocate_on_comm_stream: bool = False, handle=None, do_handle_copy: bool = False,
                 do_cpu_sync: Optional[bool] = None, do_expand: bool = False, do_zero_padding: bool = False,
                 use_tma_aligned_col_major_sf: bool = False, defer_epilogue: bool = False):
        """As :meth:`ElasticBuffer.dispatch`; with ``defer_epilogue=True`` returns only the
        event, whose first ``wait()`` returns ``(recv_x, recv_topk_idx, recv_topk_weights, handle)``."""
        if do_handle_copy:
            raise ValueError("EPBuffer.dispatch: do_handle_copy must be False (the handle keeps topk_idx)")
        return self._dispatch(x, topk_idx, topk_weights, cumulative_local_expert_recv_stats, num_experts,
                              num_max_tokens_per_rank, expert_alignment, num_sms, num_qps, previous_event,
                              None,
                              async_with_compute_stream, allocate_on_comm_stream, handle, False, do_cpu_sync,
                              do_expand, do_zero_padding, use_tma_aligned_col_major_sf, defer_epilogue)

    def combine(self, x: torch.Tensor, handle, topk_weights: Optional[torch.Tensor] = None, bias=None,
                num_sms: int = 0, num_qps: int = 0, previous_event=None,
                async_with_compute_stream: bool = False,
                allocate_on_comm_stream: bool = False, defer_epilogue: bool = False):
        """As :meth:`ElasticBuffer.combine`; with ``defer_epilogue=True`` returns only the event,
        whose first ``wait()`` returns ``(combined_x, combined_topk_weights)``."""
        return self._combine(x, handle, topk_weights, bias, num_qps, previous_event, None,
                             async_with_compute_stream, allocate_on_comm_stream, defer_epilogue)

    # ---- load balancing ----------------------------------------------------------------------
    def lb_get_theoretical_num_sms(self) -> int:
        """SMs for the load-balancing copies (a hint)."""
        return sizing.lb_theoretical_num_sms()

    def lb_prefetch_weights(self, redundant_expert_weights, expert_weights, redundancy_mapping: torch.Tensor,
                            num_sms: int = 0, previous_event=None) -> EventOverlap:
        """Fill the redundant slots of this NVLink domain from the experts' owners (collective).

        ``redundant_expert_weights``/``expert_weights``: a tensor or equal-length sequences;
        destination i ``[R, ...]`` inside this buffer's load-balancing storage, source i
        ``[L, ...]``, equal bytes per expert (a multiple of 16). ``redundancy_mapping [P, R] int32``
        (identical on the domain's P ranks): entry ``[r, c]`` = domain expert id
        ``owner * L + j`` held by slot c of domain rank r, or -1. Returns an event to ``wait()``.
        """
        return self._lb("lb_prefetch", redundant_expert_weights, expert_weights, redundancy_mapping,
                        previous_event)

    def lb_reduce_grads(self, redundant_expert_grads: torch.Tensor, expert_grads: torch.Tensor,
                        redundancy_mapping: torch.Tensor, num_sms: int = 0,
                        previous_event=None) -> EventOverlap:
        """Add every redundant slot's gradient ``[R, H] float32`` to its owner's ``[L, H]`` row
        (collective; the redundant gradients are unchanged). Returns an event to ``wait()``."""
        return self._lb("lb_reduce", redundant_expert_grads, expert_grads, redundancy_mapping, previous_event)

    def _lb(self, op: str, dst, src, mapping, previous_event) -> EventOverlap:
        self.comm.ensure_alive()
        dst_list, src_list = _as_list(dst), _as_list(src)
        error = None
        try:
            self._check_lb(op, dst_list, src_list, mapping)
        except (TypeError, ValueError) as exc:
            error = exc
        device = src_list[0].device if src_list and isinstance(src_list[0], torch.Tensor) else None
        with self._streams.call(device, as_overlap(previous_event), True) as call:
            if op == "lb_prefetch":
                lb_prefetch(self.comm, dst_list, src_list, mapping, self.num_nvlink_ranks, error=error)
            else:
                lb_reduce(self.comm, dst_list[0] if dst_list else None, src_list[0] if src_list else None,
                          mapping,
                          self.num_nvlink_ranks, error=error)
            call.keep(*dst_list, *src_list)
        return call.event

    def _check_lb(self, op: str, dst: list, src: list, mapping) -> None:
        if not dst or len(dst) != len(src):
            raise ValueError(f"{op}: need equal, non-empty sequences of destinations and sources, got "
                             f"{len(dst)} and {len(src)}")
        lb = self.runtime.lb_storage if self.runtime is not None else None
        if lb is None:
            raise ValueError(f"{op} needs a load-balancing region: "
                             "EPBuffer(..., lb_allocation_plan_or_num_bytes=plan or bytes)")
        for i, (d, s) in enumerate(zip(dst, src)):
            C.check_tensor(f"destination {i}", d)
            C.check_tensor(f"source {i}", s, device=d.device)
            if d.dim() < 1 or s.dim() < 1 or s.size(0) == 0:
                raise ValueError(f"{op}: destination {i} [R, ...] and source {i} [L > 0, ...] must be >= 1-D")
            d_bytes = d.numel() // max(1, d.size(0)) * d.element_size()
            s_bytes = s.numel() // s.size(0) * s.element_size()
            if d_bytes != s_bytes or s_bytes % 16:
                raise ValueError(f"{op}: bytes per expert must match and be a multiple of 16: "
                                 f"destination {i} has {d_bytes}, source {i} has {s_bytes}")
            start = d.data_ptr() - lb.data_ptr()
            if d.numel() and not (0 <= start and start + d.numel() * d.element_size() <= lb.numel()):
                raise ValueError(f"{op}: destination {i} must live in this buffer's load-balancing storage "
                                 "(allocate it with the BufferAllocator plan given to EPBuffer)")
            if s.size(0) != src[0].size(0):
                raise ValueError(f"{op}: every source must have the same number of local experts")
        if op == "lb_reduce":
            for name, t in (("redundant_expert_grads", dst[0]), ("expert_grads", src[0])):
                C.check_tensor(name, t, dim=2, dtypes=(torch.float32,))
        C.check_tensor("redundancy_mapping", mapping, dim=2, dtypes=(torch.int32,))
        num_local, domain = src[0].size(0), self.num_nvlink_ranks
        if mapping.size(0) != domain or mapping.size(1) != dst[0].size(0):
            raise ValueError(f"redundancy_mapping must be [{domain}, {dst[0].size(0)}] (domain ranks x "
                             f"redundant slots), got {tuple(mapping.shape)}")
        table = mapping.tolist()
        for r, row in enumerate(table):
            for c, e in enumerate(row):
                if e < -1 or e >= domain * num_local:
                    raise ValueError(f"redundancy_mapping[{r}, {c}] = {e}: expected -1 or an expert id in "
                                     f"[0, {domain * num_local})")
                if e >= 0 and e // num_local == r:
                    raise ValueError(f"redundancy_mapping[{r}, {c}] = {e}: a rank must not hold a "
                                     "redundant copy of its own expert")


def _as_list(t) -> list:
    if isinstance(t, torch.Tensor):
        return [t]
    if isinstance(t, (list, tuple)):
        return list(t)
    raise TypeError(f"expected a tensor or a sequence of tensors, got {type(t).__name__}")


def _group_device(group: dist.ProcessGroup) -> torch.device:
    """Where a buffer's own storage lives: the host for a group that moves host tensors, else the
    group's accelerator type (its current device)."""
    if group_carries(group, "cpu"):
        return torch.device("cpu")
    for kind in ("cuda", "npu", "xpu"):
        if group_carries(group, kind):
            return torch.device(kind)
    return torch.device("cpu")

