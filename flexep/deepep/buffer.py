"""``Buffer``: DeepEP V1's ``deep_ep.Buffer`` API, translated onto :class:`flexep.core.Communicator`.

``import flexep as deep_ep`` works for DeepEP V1 callers. This module only translates DeepEP's
calling convention (argument names, tuple returns, events, handles) into core requests; every
call is collective, validated on every rank, and bounded by ``timeout`` (see the core).

The low-latency and shrink-mode methods live in :mod:`flexep.deepep.buffer_ll`.

Shape legend: :mod:`flexep.algorithms.contract` (M received rows; in low-latency mode
Q = ``num_max_dispatch_tokens_per_rank``).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..algorithms.contract import (
    CachedDispatchRequest,
    CombineRequest,
    DispatchRequest,
    NormalHandle,
)
from ..comm.accounting import TrafficStats
from ..config import Config, combine_config, dispatch_config
from ..core import checks as C
from ..core.communicator import Communicator, Options
from ..device import device_of
from ..event import CommStreams, EventHandle, EventOverlap
from .buffer_ll import LowLatencyMethods

__all__ = ["Buffer", "topk_idx_t"]

topk_idx_t = torch.int64
XLike = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class Buffer(LowLatencyMethods):
    """Expert-parallel communication buffer over a process group (DeepEP V1 compatible).

    Args (DeepEP's, in DeepEP's order):
        group: the EP ``ProcessGroup``; every rank of it must construct the ``Buffer``.
        num_nvl_bytes, num_rdma_bytes: DeepEP's buffer sizes; validated (``>= 0``, multiples of
            128). In low-latency mode ``num_rdma_bytes`` must cover
            :meth:`get_low_latency_rdma_size_hint`, as in DeepEP; otherwise informational.
        low_latency_mode: enable the low-latency API.
        num_qps_per_rank: accepted (queue pairs belong to the backend; see ``num_channels``).
        allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric: accepted.
        enable_shrink: DeepEP's shrink mode: low-latency calls mask a peer that stays silent for
            ``timeout`` seconds instead of raising, and the ``low_latency_*_mask_buffer`` methods
            work (see ``docs/low-latency.md``).
        explicitly_destroy: if True, :meth:`destroy` must be called (as DeepEP).
        comm: mpi4py communicators are not supported; pass ``group``.

    flexep options (keyword only; see :class:`flexep.core.Options`): ``ranks_per_node``,
    ``hierarchical``, ``num_channels``, ``timeout``, ``check_consistency``, ``validate``,
    ``verify``, ``generation``.
    """

    num_sms: int = 20

    def __init__(self, group: Optional[dist.ProcessGroup], num_nvl_bytes: int = 0,
                 num_rdma_bytes: int = 0, low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm: Optional[object] = None, *,
                 ranks_per_node: Optional[int] = None, hierarchical: bool = True,
                 num_channels: Optional[int] = None, timeout: Optional[float] = None,
                 check_consistency: bool = True, validate: Optional[bool] = None,
                 verify: Optional[bool] = None, generation: int = 0,
                 _fault_hook: Optional[Callable[[str], None]] = None) -> None:
        if group is None:
            if comm is not None:
                raise ValueError("flexep runs on torch.distributed: pass a ProcessGroup as group "
                                 "(mpi4py communicators are not supported)")
            raise ValueError("group must be a torch.distributed ProcessGroup, got None")
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
        error: Optional[Exception] = None  # shipped in the construction round: every rank raises
        try:
            C.check_int("num_nvl_bytes", num_nvl_bytes, minimum=0, multiple=128)
            C.check_int("num_rdma_bytes", num_rdma_bytes, minimum=0, multiple=128)
            C.check_int("num_qps_per_rank", num_qps_per_rank, minimum=1)
        except (TypeError, ValueError) as exc:
            error = exc
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = bool(low_latency_mode)
        self.num_qps_per_rank = num_qps_per_rank
        self.explicitly_destroy = bool(explicitly_destroy)
        self.enable_shrink = bool(enable_shrink)
        options = Options(ranks_per_node=ranks_per_node, hierarchical=hierarchical,
                          num_channels=num_channels, timeout=timeout,
                          check_consistency=check_consistency, validate=validate, verify=verify,
                          generation=generation)
        self.comm = Communicator(group, options, agree={"low_latency_mode": int(self.low_latency_mode),
                                                         "enable_shrink": int(self.enable_shrink)},
                                 error=error, label="Buffer", fault_hook=_fault_hook)
        self.topology, self.hierarchical = self.comm.topology, self.comm.hierarchical
        self.num_channels, self.uid = self.comm.num_channels, self.comm.uid
        self.check_consistency, self.validate = self.comm.check_consistency, validate
        self._streams = CommStreams()
        self._ll_combine_buffer: Optional[torch.Tensor] = None
        self._raw_buffers: dict[str, torch.Tensor] = {}  # get_local_buffer_tensor's, on first use
        if self.low_latency_mode:
            self.comm.prepare_low_latency()
        if self.enable_shrink:
            self.comm.enable_shrink()

    # ---- DeepEP class/static helpers -------------------------------------------------------
    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: FP8 paths are available on every backend (moved as bytes)."""
        return True

    @classmethod
    def set_num_sms(cls, new_num_sms: int) -> None:
        """Set the class-wide SM count used by the default configs (must be even)."""
        C.check_int("new_num_sms", new_num_sms, minimum=0)
        if new_num_sms % 2:
            raise ValueError(f"new_num_sms must be even, got {new_num_sms}")
        cls.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream of this process's accelerator (DeepEP's ``capture``)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's tuned dispatch config for ``num_ranks`` with ``Buffer.num_sms``."""
        return dispatch_config(C.check_int("num_ranks", num_ranks, minimum=1), Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """DeepEP's tuned combine config for ``num_ranks`` with ``Buffer.num_sms``."""
        return combine_config(C.check_int("num_ranks", num_ranks, minimum=1), Buffer.num_sms)

    # ---- lifecycle -------------------------------------------------------------------------
    def destroy(self) -> None:
        """Release the buffer (requires ``explicitly_destroy=True``). Never blocks on peers."""
        if not self.explicitly_destroy:
            raise RuntimeError("destroy() needs Buffer(..., explicitly_destroy=True)")
        self.comm.destroy()

    def get_comm_stream(self):
        """The communication stream of this process's accelerator, ``None`` without streams."""
        return self._streams.get(EventHandle().device)

    def get_local_buffer_tensor(self, dtype: torch.dtype, size=None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """A 1-D ``dtype`` view of this rank's NVL buffer (or RDMA buffer with ``use_rdma_buffer``)
        starting ``offset`` bytes in, reshaped to ``size`` when given (DeepEP's semantics).

        flexep's calls never use these bytes (they allocate per call), so the buffer is memory of
        ``num_nvl_bytes`` / ``num_rdma_bytes`` on this process's accelerator (else the CPU),
        allocated on the first request and kept by the ``Buffer``: callers that clear or stage
        data through it (vLLM zeroes it before a retry) keep working, and nothing else reads it.
        """
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        num_bytes = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        C.check_int("offset", offset, minimum=0)
        if offset > num_bytes:
            raise ValueError(f"offset {offset} is past the end of the {num_bytes}-byte "
                             f"{'RDMA' if use_rdma_buffer else 'NVL'} buffer")
        element = dtype.itemsize
        if offset % element:
            raise ValueError(f"offset must be a multiple of {dtype}'s {element} bytes, got {offset}")
        key = "rdma" if use_rdma_buffer else "nvl"
        raw = self._raw_buffers.get(key)
        if raw is None:
            raw = self._raw_buffers[key] = torch.zeros(num_bytes, dtype=torch.uint8,
                                                       device=EventHandle().device)
        view = raw[offset:offset + (num_bytes - offset) // element * element].view(dtype)
        if size is None:
            return view
        shape = torch.Size(size)
        if shape.numel() > view.numel():
            raise ValueError(f"size {tuple(shape)} needs {shape.numel()} elements of {dtype}, the "
                             f"buffer holds {view.numel()} from offset {offset}")
        return view[:shape.numel()].view(shape)

    @property
    def runtime(self):
        """The transport (None once destroyed)."""
        return self.comm._tp

    @property
    def last_traffic(self) -> TrafficStats:
        """Bytes the last call on this rank sent per link class, next to the routing's minimum."""
        return self.comm.last_traffic

    # ---- normal mode -----------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False):
        """Counts for dispatching ``topk_idx: [T, K] int64`` (``-1`` = unused slot). Local only.

        Returns ``(num_tokens_per_rank [W] int32, num_tokens_per_rdma_rank [N] int32 or None
        on one node, num_tokens_per_expert [E] int32, is_token_in_rank [T, W] bool, event)``.
        """
        self.comm.ensure_alive()
        C.check_flags(previous_event, async_finish, allocate_on_comm_stream)
        with self._call(device_of(topk_idx), previous_event, async_finish) as call:
            lay = self.comm.layout(topk_idx, num_experts)
            call.keep(topk_idx, lay.num_tokens_per_rank, lay.num_tokens_per_node,
                      lay.num_tokens_per_expert, lay.is_token_in_rank)
        return (lay.num_tokens_per_rank, lay.num_tokens_per_node, lay.num_tokens_per_expert,
                lay.is_token_in_rank, call.event)

    def dispatch(self, x: XLike, handle: Optional[NormalHandle] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """Send each token to every rank holding one of its experts (DeepEP's ``dispatch``).

        ``x``: ``[T, H]`` bf16/fp16/fp32/fp64 or ``(e4m3 [T, H], scales [T, S] float32 or packed
        UE8M0 int32)``, any ``S`` and strides. With ``handle`` it is a cached dispatch (no routing arguments).
        ``num_worst_tokens > 0`` gives exactly that many output rows (zero-padded), ``[]`` counts.

        Returns ``(recv_x [M, H] (or the FP8 tuple), recv_topk_idx [M, K] int64 local ids (-1
        elsewhere), recv_topk_weights [M, K] float32, num_recv_tokens_per_expert_list (aligned
        python ints; None when cached), handle, event)``. Rows are grouped by source rank in
        rank order, in source token order.
        """
        if handle is not None:
            return self._cached_dispatch(x, handle, topk_idx, topk_weights, config, previous_event,
                                         async_finish, allocate_on_comm_stream)

        def request() -> DispatchRequest:
            C.check_flags(previous_event, async_finish, allocate_on_comm_stream)
            data, scales = C.split_x(x)
            C.check_tensor("num_tokens_per_expert", num_tokens_per_expert, dim=1,
                           dtypes=(torch.int32, torch.int64))
            num_experts = C.check_num_experts(num_tokens_per_expert.numel(), self.group_size,
                                              name="num_tokens_per_expert.numel()")
            cfg = self._config(config, self.get_dispatch_config)
            return DispatchRequest(
                x=data, scales=scales, is_token_in_rank=is_token_in_rank,
                num_tokens_per_expert=num_tokens_per_expert, num_experts=num_experts,
                topk_idx=_as_int64(topk_idx),
                topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
                expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
                handle_channels=max(1, cfg.num_sms // 2))
        with self._call(device_of(x), previous_event, async_finish) as call:
            out = self.comm.dispatch(request)
            call.keep(x, topk_idx, topk_weights, out.x, out.scales, out.topk_idx, out.topk_weights)
        recv_x = out.x if out.scales is None else (out.x, out.scales)
        return (recv_x, out.topk_idx, out.topk_weights, out.num_recv_tokens_per_expert, out.handle,
                call.event)

    def _cached_dispatch(self, x, handle, topk_idx, topk_weights, config, previous_event, async_finish,
                         allocate_on_comm_stream):
        def request() -> CachedDispatchRequest:
            C.check_flags(previous_event, async_finish, allocate_on_comm_stream)
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("cached dispatch (handle=...) takes no topk_idx/topk_weights")
            _check_normal_handle(handle)
            data, scales = C.split_x(x)
            self._config(config, self.get_dispatch_config)
            return CachedDispatchRequest(x=data, scales=scales, handle=handle)
        with self._call(device_of(x), previous_event, async_finish) as call:
            out = self.comm.cached_dispatch(request)
            call.keep(x, out.x, out.scales)
        recv_x = out.x if out.scales is None else (out.x, out.scales)
        return recv_x, None, None, None, None, call.event

    def combine(self, x: torch.Tensor, handle: NormalHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[None, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Return every received row to its source and sum per original token (unweighted).

        ``x: [M, H']`` (any width agreed across ranks), ``topk_weights: [M, K] float32`` summed
        the same way, ``bias``: None, ``[T, H']`` or a pair, added once. Returns
        ``(combined_x [T, H'], combined_topk_weights [T, K] or None, event)``, float32
        accumulation rounded once.
        """
        def request() -> CombineRequest:
            C.check_flags(previous_event, async_finish, allocate_on_comm_stream)
            _check_normal_handle(handle)
            self._config(config, self.get_combine_config)
            return CombineRequest(x=x, handle=handle, topk_weights=topk_weights, bias=_unpack_bias(bias))
        with self._call(device_of(x), previous_event, async_finish) as call:
            out = self.comm.combine(request)
            call.keep(x, topk_weights, out.x, out.topk_weights)
        return out.x, out.topk_weights, call.event

    def internode_dispatch(self, x: XLike, handle: Optional[NormalHandle] = None,
                           num_tokens_per_rank: Optional[torch.Tensor] = None,
                           num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                           is_token_in_rank: Optional[torch.Tensor] = None,
                           num_tokens_per_expert: Optional[torch.Tensor] = None,
                           topk_idx: Optional[torch.Tensor] = None,
                           topk_weights: Optional[torch.Tensor] = None, expert_alignment: int = 1,
                           num_worst_tokens: int = 0, config: Optional[Config] = None,
                           previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                           allocate_on_comm_stream: bool = False):
        """DeepEP's internode entry point (``config`` required); same as :meth:`dispatch`."""
        if config is None:
            raise ValueError("internode_dispatch requires config (use dispatch for the default)")
        return self.dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                             num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                             num_worst_tokens, config, previous_event, async_finish, allocate_on_comm_stream)

    def internode_combine(self, x: torch.Tensor, handle: NormalHandle,
                          topk_weights: Optional[torch.Tensor] = None, bias=None,
                          config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                          async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """DeepEP's internode entry point (``config`` required); same as :meth:`combine`."""
        if config is None:
            raise ValueError("internode_combine requires config (use combine for the default)")
        return self.combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                            allocate_on_comm_stream)

    # ---- helpers ---------------------------------------------------------------------------
    def _call(self, device: Optional[torch.device], previous_event, async_finish):
        return self._streams.call(device, previous_event, async_finish)

    def _config(self, config, default) -> Config:
        if config is None:
            return default(self.group_size)
        if not isinstance(config, Config):
            raise TypeError(f"config must be a flexep.Config, got {type(config).__name__}")
        return config


def _as_int64(t):
    """int32 top-k ids are accepted and widened; anything else is left for the checks to name."""
    return t.long() if isinstance(t, torch.Tensor) and t.dtype == torch.int32 else t


def _check_normal_handle(handle) -> None:
    if not isinstance(handle, NormalHandle):
        raise TypeError(f"handle must be the handle returned by Buffer.dispatch, got {type(handle).__name__}")


def _unpack_bias(bias) -> tuple:
    if bias is None:
        return ()
    if isinstance(bias, torch.Tensor):
        return (bias,)
    if isinstance(bias, (tuple, list)) and len(bias) == 2:
        return tuple(b for b in bias if b is not None)
    raise TypeError(f"bias must be None, a tensor or a pair of tensors, got {type(bias).__name__}")
