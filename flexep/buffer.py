"""``Buffer``: DeepEP V1's ``deep_ep.Buffer`` API on any ``torch.distributed`` backend.

``import flexep as deep_ep`` works for DeepEP callers. The facade only translates DeepEP's calling
convention; the algorithms live in :mod:`flexep.normal`, :mod:`flexep.hierarchical` and
:mod:`flexep.low_latency`, the wire protocol in :mod:`flexep.protocol` and
:mod:`flexep.transport`.

Every public call is collective over the group (like DeepEP's). Each one:

1. validates its inputs locally (``ValueError``/``TypeError`` naming the argument);
2. runs the header round, so a bad input, a mismatched argument or a skipped call on *any* rank
   raises on *every* rank instead of hanging or corrupting;
3. moves data under one deadline (``timeout``), reporting the ranks not heard from on failure.

Shape legend: T tokens, H hidden, K top-k, E experts, W ranks, L = E / W local experts,
M received tokens, N nodes.
"""

from __future__ import annotations

import os
import random
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import _validate as V
from . import hierarchical, low_latency, normal
from .accounting import minimum_bytes
from .config import Config, combine_config, dispatch_config
from .errors import CapacityError, RemoteInputError
from .event import EventHandle, EventOverlap
from .hierarchical import node_membership
from .layout import compute_layout
from .protocol import dtype_code, header_round
from .topology import Topology, build_topology_groups, resolve_ranks_per_node
from .transport import TrafficStats, Transport

__all__ = ["Buffer", "topk_idx_t"]

topk_idx_t = torch.int64
XLike = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class Buffer:
    """Expert-parallel communication buffer over a process group (DeepEP V1 compatible).

    Args (DeepEP's, in DeepEP's order):
        group: the EP ``ProcessGroup``; every rank of it must construct the ``Buffer``.
        num_nvl_bytes, num_rdma_bytes: DeepEP's buffer sizes; validated (``>= 0``, multiples
            of 128). flexep allocates per call, so in normal mode they only document intent;
            in low-latency mode ``num_rdma_bytes`` must cover
            :meth:`get_low_latency_rdma_size_hint`, as in DeepEP.
        low_latency_mode: enable the low-latency API.
        num_qps_per_rank: accepted for compatibility (RDMA queue pairs have no meaning on
            ``torch.distributed``; use ``num_channels``).
        allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric, enable_shrink: accepted,
            no effect (transport choice belongs to the backend).
        explicitly_destroy: if True, :meth:`destroy` must be called (as DeepEP).
        comm: mpi4py communicators are not supported; pass ``group``.

    flexep options (keyword only):
        ranks_per_node: node shape for hierarchical exchange (default: torchrun's
            ``LOCAL_WORLD_SIZE``, ``FLEXEP_RANKS_PER_NODE`` or hostnames). Smaller values make
            "virtual nodes" on one machine.
        hierarchical: use the two-level algorithm when the group spans several nodes (default
            True); False forces the flat algorithm, for comparison.
        num_channels: split every exchange into this many concurrent channels (own process
            groups; on NCCL/HCCL separate communicators and streams, on Gloo separate TCP pairs).
        timeout: seconds a call may wait in total before raising
            :class:`~flexep.errors.CommTimeoutError` naming the silent ranks (default 100, as
            DeepEP's timeouts; ``FLEXEP_TIMEOUT`` overrides).
        check_consistency: run the cross-rank agreement checks in the header round (default
            True; costs one tiny all-gather on calls that would not need it). With False,
            disagreeing arguments go undetected (a size disagreement can abort Gloo or corrupt
            silently), and a bad input to combine, cached or low-latency calls raises on its
            rank only while the peers time out naming that rank.
        validate: check tensor contents (``topk_idx`` range, duplicates); costs a device sync
            on accelerators.
        verify: checksum every exchange and raise on any lost or altered row (default off, or
            ``FLEXEP_VERIFY=1``).
    """

    num_sms: int = 20

    def __init__(self, group: Optional[dist.ProcessGroup], num_nvl_bytes: int = 0,
                 num_rdma_bytes: int = 0, low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm: Optional[object] = None, *,
                 ranks_per_node: Optional[int] = None, hierarchical: bool = True,
                 num_channels: int = 1, timeout: Optional[float] = None,
                 check_consistency: bool = True, validate: bool = True,
                 verify: Optional[bool] = None,
                 _fault_hook: Optional[Callable[[str], None]] = None) -> None:
        if group is None:
            if comm is not None:
                raise ValueError("flexep runs on torch.distributed: pass a ProcessGroup as group "
                                 "(mpi4py communicators are not supported)")
            raise ValueError("group must be a torch.distributed ProcessGroup, got None")
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
        # A bad argument is shipped in the construction all-gather below, so the other ranks
        # raise RemoteInputError at once instead of waiting for this rank until their timeout.
        error: Optional[Exception] = None
        try:
            V.check_int("num_nvl_bytes", num_nvl_bytes, minimum=0, multiple=128)
            V.check_int("num_rdma_bytes", num_rdma_bytes, minimum=0, multiple=128)
            V.check_int("num_qps_per_rank", num_qps_per_rank, minimum=1)
            V.check_int("num_channels", num_channels, minimum=1)
            timeout = _resolve_timeout(timeout)
        except (TypeError, ValueError) as exc:
            error, timeout, num_channels = exc, _resolve_timeout(None), 1
        if verify is None:
            verify = os.environ.get("FLEXEP_VERIFY", "0") not in ("", "0")

        self.group = group
        self.rank = group.rank()
        self.group_size = group.size()
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = bool(low_latency_mode)
        self.num_qps_per_rank = num_qps_per_rank
        self.explicitly_destroy = bool(explicitly_destroy)
        self.enable_shrink = bool(enable_shrink)
        self.check_consistency = bool(check_consistency)
        self.validate = bool(validate)
        self.num_channels = num_channels
        self.runtime: Optional[Transport] = None

        try:
            self.topology = Topology(self.group_size, resolve_ranks_per_node(group, ranks_per_node))
        except (TypeError, ValueError) as exc:  # reported through the all-gather below, too
            error, self.topology = error or exc, Topology(self.group_size, self.group_size)
        self.hierarchical = bool(hierarchical) and self.topology.is_multi_node
        tp = Transport(group, self.topology, float(timeout), {}, _fault_hook, 0, bool(verify))
        # One all-gather: a shared id for this Buffer (names its store keys) and a check that
        # every rank built it the same way. It comes before the channel and topology groups are
        # created: new_group is collective, and ranks creating different numbers of groups would
        # wait for each other up to the process group's timeout instead of raising here.
        mine = torch.tensor([random.getrandbits(62), self.topology.ranks_per_node, num_channels,
                             int(self.low_latency_mode), int(self.hierarchical), int(error is not None)],
                            dtype=torch.int64)
        tp.begin("init")
        table = tp.all_gather("init", mine)
        rejected = [r for r, flag in enumerate(table[:, 5].tolist()) if flag]
        if error is not None:
            raise error
        if rejected:
            raise RemoteInputError(f"rank(s) {rejected} rejected their Buffer arguments; see the "
                                   "ValueError/TypeError raised on those ranks", op="Buffer",
                                   phase="init", ranks=rejected)
        for col, name in enumerate(("ranks_per_node", "num_channels", "low_latency_mode",
                                    "hierarchical"), start=1):
            if len(set(table[:, col].tolist())) > 1:
                raise ValueError(f"Buffer: ranks disagree on {name}: {table[:, col].tolist()}")
        channel_groups = {"ep": [dist.new_group(dist.get_process_group_ranks(group))
                                 for _ in range(num_channels - 1)]}
        self._topo_groups = None
        if self.hierarchical:
            self._topo_groups = build_topology_groups(group, self.topology)
            extra = [build_topology_groups(group, self.topology) for _ in range(num_channels - 1)]
            channel_groups["intra"] = [g.intra for g in extra]
            channel_groups["rail"] = [g.rail for g in extra]
        tp.channel_groups = channel_groups
        tp.uid = int(table[0, 0])
        self.uid = tp.uid
        self.runtime = tp
        self._ll_state = None

    # ---- DeepEP class/static helpers -------------------------------------------------------
    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: FP8 paths are available on every backend (moved as bytes)."""
        return True

    @classmethod
    def set_num_sms(cls, new_num_sms: int) -> None:
        """Set the class-wide SM count used by the default configs (must be even)."""
        V.check_int("new_num_sms", new_num_sms, minimum=0)
        if new_num_sms % 2:
            raise ValueError(f"new_num_sms must be even, got {new_num_sms}")
        cls.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream, to pass as ``previous_event``."""
        dev = torch.device("cuda") if torch.cuda.is_available() else None
        return EventOverlap(EventHandle(dev))

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's tuned dispatch config for ``num_ranks`` with ``Buffer.num_sms``."""
        return dispatch_config(V.check_int("num_ranks", num_ranks, minimum=1), Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """DeepEP's tuned combine config for ``num_ranks`` with ``Buffer.num_sms``."""
        return combine_config(V.check_int("num_ranks", num_ranks, minimum=1), Buffer.num_sms)

    # ---- lifecycle -------------------------------------------------------------------------
    def destroy(self) -> None:
        """Release the buffer (requires ``explicitly_destroy=True``). Never blocks on peers."""
        if not self.explicitly_destroy:
            raise RuntimeError("destroy() needs Buffer(..., explicitly_destroy=True)")
        self.runtime = None

    def get_comm_stream(self):
        """The stream communication runs on: the current device stream, ``None`` on CPU."""
        return torch.cuda.current_stream() if torch.cuda.is_available() else None

    def get_local_buffer_tensor(self, dtype: torch.dtype, size=None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """Not available: flexep has no registered symmetric buffer to expose."""
        raise NotImplementedError("flexep allocates per call and has no raw NVL/RDMA buffer to view")

    def _alive(self) -> Transport:
        if self.runtime is None:
            raise RuntimeError("this Buffer was destroyed; create a new one")
        return self.runtime

    def _tp(self, op: str) -> Transport:
        tp = self._alive()
        tp.begin(op)
        return tp

    @property
    def last_traffic(self) -> TrafficStats:
        """Bytes the last call on this rank sent per link class, next to the routing's minimum."""
        return self._alive().stats

    @staticmethod
    def _event(async_finish: bool, tensors) -> EventOverlap:
        if not async_finish:
            return EventOverlap(None)
        device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), None)
        return EventOverlap(EventHandle(device), extra_tensors=tuple(
            t for t in tensors if isinstance(t, torch.Tensor)))

    # ---- normal mode -----------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False
                            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor,
                                       EventOverlap]:
        """Counts for dispatching ``topk_idx: [T, K] int64`` (``-1`` = unused slot). Local only.

        Returns:
            num_tokens_per_rank: ``[W] int32``, distinct tokens with an expert on each rank.
            num_tokens_per_rdma_rank: ``[N] int32`` per node, or None on a single node.
            num_tokens_per_expert: ``[E] int32``.
            is_token_in_rank: ``[T, W] bool``.
            event: ``EventOverlap`` (holds an event only with ``async_finish``).
        """
        self._alive()
        V.check_flags(previous_event, async_finish, allocate_on_comm_stream)
        V.check_num_experts(num_experts, self.group_size)
        topk_idx = V.check_topk_idx(topk_idx, None, num_experts, values=self.validate)
        lay = compute_layout(topk_idx, num_experts, self.group_size, self.topology.ranks_per_node)
        return (lay.num_tokens_per_rank, lay.num_tokens_per_node, lay.num_tokens_per_expert,
                lay.is_token_in_rank, self._event(async_finish, [lay.is_token_in_rank]))

    def dispatch(self, x: XLike, handle: Optional[normal.NormalHandle] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False
                 ) -> Tuple[XLike, Optional[torch.Tensor], Optional[torch.Tensor], Optional[List[int]],
                            normal.NormalHandle, EventOverlap]:
        """Send each token once to every rank holding one of its experts.

        Args:
            x: ``[T, H]`` bf16/fp16/fp32, or ``(e4m3 [T, H], scales [T, H/128] float32)``
                (scales may be packed UE8M0 ``[T, H/512] int32`` and have any strides).
            handle: from a previous dispatch: cached dispatch of ``x`` along the same routing
                (``topk_idx``/``topk_weights`` must then be None).
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
            num_tokens_per_expert: from :meth:`get_dispatch_layout`.
            topk_idx: ``[T, K] int64`` global expert ids, ``-1`` unused; optional, with
                ``topk_weights: [T, K] float32``.
            expert_alignment: round each returned per-expert count up to this multiple.
            num_worst_tokens: if > 0, every output has exactly this many rows (extra rows zero,
                ``recv_topk_idx`` -1) and the count list is ``[]``; needs ``topk_idx``.
            config: DeepEP ``Config`` (performance only; its ``num_sms`` sets the handle's
                channel-matrix width).

        Returns:
            recv_x: ``[M, H]`` (or the FP8 tuple with row-major scales), rows grouped by source
                rank in rank order, source token order inside each rank.
            recv_topk_idx: ``[M, K] int64`` local expert ids, ``-1`` for experts elsewhere.
            recv_topk_weights: ``[M, K] float32``, 0 where ``recv_topk_idx`` is -1.
            num_recv_tokens_per_expert_list: ``[L]`` python ints, aligned; None when cached.
            handle: :class:`~flexep.normal.NormalHandle` for combine / cached dispatch.
            event: ``EventOverlap``.
        """
        if handle is not None:
            return self._cached_dispatch(x, handle, topk_idx, topk_weights, config, previous_event,
                                         async_finish, allocate_on_comm_stream)
        tp = self._tp("dispatch")
        error, data, scales, num_experts, config_ = None, None, None, -1, None
        try:
            V.check_flags(previous_event, async_finish, allocate_on_comm_stream)
            data, scales = V.split_x(x)
            num_tokens = data.size(0)
            V.check_tensor("num_tokens_per_expert", num_tokens_per_expert, dim=1,
                           dtypes=(torch.int32, torch.int64))
            num_experts = V.check_num_experts(num_tokens_per_expert.numel(), self.group_size,
                                              name="num_tokens_per_expert.numel()")
            V.check_tensor("num_tokens_per_rank", num_tokens_per_rank, dim=1,
                           dtypes=(torch.int32, torch.int64))
            if num_tokens_per_rank.numel() != self.group_size:
                raise ValueError(f"num_tokens_per_rank must be [{self.group_size}], "
                                 f"got {tuple(num_tokens_per_rank.shape)}")
            V.check_tensor("is_token_in_rank", is_token_in_rank, dim=2, dtypes=(torch.bool,),
                           rows=num_tokens, device=data.device)
            if is_token_in_rank.size(1) != self.group_size:
                raise ValueError(f"is_token_in_rank must be [{num_tokens}, {self.group_size}], "
                                 f"got {tuple(is_token_in_rank.shape)}")
            if (topk_idx is None) != (topk_weights is None):
                raise ValueError("topk_idx and topk_weights must be given together (or both None)")
            if topk_idx is not None:
                topk_idx = V.check_topk_idx(topk_idx, num_tokens, num_experts, values=self.validate,
                                            device=data.device)
                V.check_topk_weights(topk_weights, topk_idx)
            V.check_int("expert_alignment", expert_alignment, minimum=1)
            V.check_int("num_worst_tokens", num_worst_tokens, minimum=0)
            if num_worst_tokens and topk_idx is None:
                raise ValueError("num_worst_tokens > 0 requires topk_idx and topk_weights")
            config_ = self._config(config, self.get_dispatch_config)
            send_counts = is_token_in_rank.sum(0)
            node_counts = None
            if self.hierarchical:
                node_counts = node_membership(is_token_in_rank, self.topology.ranks_per_node).sum(0)
            if self.validate and not torch.equal(send_counts.to(num_tokens_per_rank.dtype),
                                                 num_tokens_per_rank):
                raise ValueError("num_tokens_per_rank does not match is_token_in_rank.sum(0): "
                                 f"got {num_tokens_per_rank.tolist()}, expected {send_counts.tolist()}")
        except (TypeError, ValueError) as exc:
            error, send_counts, node_counts = exc, None, None
        algo, staged = self._normal_algorithm(), []

        def stage() -> None:  # the send rows depend on local inputs only: build them meanwhile
            staged.append(algo.stage(tp, data, scales, topk_idx, topk_weights, is_token_in_rank))

        header = header_round(
            tp, "dispatch", error=error, send_counts=send_counts, check=self.check_consistency,
            extra_width=self.topology.num_nodes if self.hierarchical else 0, extra=node_counts,
            meanwhile=None if error else stage,
            **({} if error else self._agree(data, scales, num_experts, topk_idx)),
            num_tokens=data.size(0) if data is not None else 0,
            num_worst_tokens=num_worst_tokens if error is None else 0)
        counts = header.counts
        _check_worst_tokens(tp, header)
        res = algo.dispatch(tp, staged[0], data, scales, topk_idx, is_token_in_rank, counts,
                            header.field("num_tokens"), num_experts, num_worst_tokens,
                            expert_alignment, num_tokens_per_expert, config_.num_channels, self.uid,
                            **self._algo_kwargs(header))
        self._fill_minimum(res.handle, _row_bytes(data, scales, topk_idx) + 4)
        recv_x = res.recv_x if scales is None else (res.recv_x, res.recv_scales)
        event = self._event(async_finish, [res.recv_x])
        return recv_x, res.recv_topk_idx, res.recv_topk_weights, res.num_recv_tokens_per_expert, \
            res.handle, event

    def _cached_dispatch(self, x, handle, topk_idx, topk_weights, config, previous_event,
                         async_finish, allocate_on_comm_stream):
        tp = self._tp("cached_dispatch")
        error, data, scales = None, None, None
        try:
            V.check_flags(previous_event, async_finish, allocate_on_comm_stream)
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("cached dispatch (handle=...) takes no topk_idx/topk_weights")
            self._check_handle(handle)
            data, scales = V.split_x(x)
            if data.size(0) != handle.num_tokens:
                raise ValueError(f"x must have {handle.num_tokens} rows (the handle's tokens), "
                                 f"got {tuple(data.shape)}")
            self._config(config, self.get_dispatch_config)
        except (TypeError, ValueError) as exc:
            error = exc
        self._agreement_round(tp, "cached_dispatch", error, lambda: self._agree(data, scales, -2, None))
        recv_x, recv_scales = self._normal_algorithm().cached_dispatch(tp, data, scales, handle)
        self._fill_minimum(handle, _row_bytes(data, scales, None), cached=True)
        out = recv_x if scales is None else (recv_x, recv_scales)
        return out, None, None, None, None, self._event(async_finish, [recv_x])

    def combine(self, x: torch.Tensor, handle: normal.NormalHandle,
                topk_weights: Optional[torch.Tensor] = None,
                bias: Union[None, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Return every received row to its source and sum per original token.

        Args:
            x: ``[M, H']`` bf16/fp16/fp32, row i is this rank's result for its i-th received token
                (``M`` = the handle's rows, ``num_worst_tokens`` if that was used; ``H'`` may differ
                from the dispatched hidden size, as in DeepEP, but must agree across ranks).
            handle: from :meth:`dispatch`.
            topk_weights: optional ``[M, K] float32``, summed the same way.
            bias: None, ``[T, H]`` or a pair of ``[T, H]`` tensors (dtype of ``x``) added once.

        Returns:
            combined_x: ``[T, H]`` dtype of ``x``: for token t, ``sum(bias) + sum over the ranks
                that received t of their row`` (unweighted), accumulated in float32.
            combined_topk_weights: ``[T, K] float32`` or None, summed the same way.
            event: ``EventOverlap``.
        """
        tp = self._tp("combine")
        error, biases = None, ()
        try:
            V.check_flags(previous_event, async_finish, allocate_on_comm_stream)
            self._check_handle(handle)
            # Any width: combine may return rows of another size than were dispatched (DeepEP).
            V.check_tensor("x", x, dim=2, dtypes=V.FLOAT_DTYPES, rows=handle.num_rows)
            if topk_weights is not None:
                V.check_tensor("topk_weights", topk_weights, dim=2, dtypes=(torch.float32,),
                               rows=handle.num_rows)
            biases = self._unpack_bias(bias)
            for i, b in enumerate(biases):
                V.check_tensor(f"bias[{i}]", b, dim=2, dtypes=(x.dtype,), rows=handle.num_tokens)
                if b.size(1) != x.size(1):
                    raise ValueError(f"bias[{i}] must be [{handle.num_tokens}, {x.size(1)}], "
                                     f"got {tuple(b.shape)}")
            self._config(config, self.get_combine_config)
        except (TypeError, ValueError) as exc:
            error = exc
        self._agreement_round(tp, "combine", error, lambda: dict(
            hidden=x.size(1), x_dtype=dtype_code(x.dtype), has_weights=int(topk_weights is not None)))
        out, w = self._normal_algorithm().combine(tp, x, handle, topk_weights, biases)
        self._fill_minimum(handle, _row_bytes(x, None, topk_weights), reverse=True)
        return out, w, self._event(async_finish, [out])

    def internode_dispatch(self, x: XLike, handle: Optional[normal.NormalHandle] = None,
                           num_tokens_per_rank: Optional[torch.Tensor] = None,
                           num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                           is_token_in_rank: Optional[torch.Tensor] = None,
                           num_tokens_per_expert: Optional[torch.Tensor] = None,
                           topk_idx: Optional[torch.Tensor] = None,
                           topk_weights: Optional[torch.Tensor] = None, expert_alignment: int = 1,
                           num_worst_tokens: int = 0, config: Optional[Config] = None,
                           previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                           allocate_on_comm_stream: bool = False):
        """DeepEP's internode entry point (``config`` required); :meth:`dispatch` picks the
        algorithm from the topology, so call that instead."""
        if config is None:
            raise ValueError("internode_dispatch requires config (use dispatch for the default)")
        return self.dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                             num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                             num_worst_tokens, config, previous_event, async_finish,
                             allocate_on_comm_stream)

    def internode_combine(self, x: torch.Tensor, handle: normal.NormalHandle,
                          topk_weights: Optional[torch.Tensor] = None, bias=None,
                          config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                          async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """DeepEP's internode entry point (``config`` required); see :meth:`combine`."""
        if config is None:
            raise ValueError("internode_combine requires config (use combine for the default)")
        return self.combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                            allocate_on_comm_stream)

    # ---- low-latency mode ------------------------------------------------------------------
    # Fixed-capacity dispatch/combine for decoding; the algorithm is flexep.low_latency. Every
    # rank must pass the same num_max_dispatch_tokens_per_rank, hidden and num_experts.
    # Host syncs: the default header round (one tiny all-gather read on the host) makes bad
    # inputs and mismatched ranks raise on every rank; Buffer(check_consistency=False,
    # validate=False) skips it and the topk_idx value checks, and then nothing on the path reads
    # a tensor on the host (CUDA-graph capturable on NCCL). Unlike DeepEP, normal and LL calls
    # share nothing, so no cleaning is needed between them (clean_low_latency_buffer is accepted),
    # and results are fresh tensors, so any number of them may be held at once.

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                       num_ranks: int, num_experts: int) -> int:
        """DeepEP's minimum ``num_rdma_bytes`` for LL mode, same formula (``num_ranks`` unused).

        Example: ``(128, 7168, 8, 256) -> 1_908_410_496``. flexep allocates per call; the size
        is enforced so that a configuration that works here also works on DeepEP.
        """
        for name, value in (("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank),
                            ("hidden", hidden), ("num_ranks", num_ranks), ("num_experts", num_experts)):
            V.check_int(name, value, minimum=1)
        return low_latency.rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks,
                                          num_experts)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int,
                                 num_experts: int) -> None:
        """DeepEP's reset of the LL signalling buffers. Collective; acts as a barrier.

        flexep keeps no LL state between calls, so there is nothing to clean: the call checks its
        arguments (as DeepEP's would fail on them) and that every rank makes it. Normal-mode and
        LL calls on one ``Buffer`` work with or without it.
        """
        self._require_low_latency("clean_low_latency_buffer")
        tp = self._tp("ll_clean")
        error = None
        try:
            V.check_int("hidden", hidden, minimum=1)
            self._check_ll_size(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        except (TypeError, ValueError) as exc:
            error = exc
        header_round(tp, "ll_clean", error=error, check=self.check_consistency,
                     **({} if error else dict(capacity=num_max_dispatch_tokens_per_rank, hidden=hidden,
                                              num_experts=num_experts)))

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor,
                             num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False
                             ) -> Tuple[XLike, torch.Tensor, low_latency.LowLatencyHandle, EventOverlap,
                                        Optional[Callable[[], None]]]:
        """Send each token to the experts it chose, into a fixed-capacity per-expert layout.

        Args:
            x: ``[T, H]`` bf16 (fp16/fp32 accepted), ``T <= num_max_dispatch_tokens_per_rank``.
            topk_idx: ``[T, K] int64`` global expert ids, ``-1`` = unused slot.
            num_max_dispatch_tokens_per_rank: M, capacity per rank (equal on all ranks).
            num_experts: E, divisible by the group size W; L = E / W local experts.
            cumulative_local_expert_recv_stats: optional ``[L] int32``; ``recv_count`` is added.
            dispatch_wait_recv_cost_stats: optional ``[W] int64``; accepted, left unchanged (a
                collective cannot attribute waiting to one source rank).
            use_fp8: cast to FP8 e4m3 with per-128-channel scales before sending (H % 128 == 0).
            round_scale: round scales up to powers of two. use_ue8m0: pack them as UE8M0 bytes
                in int32 (needs ``round_scale`` and H % 512 == 0).
            async_finish: return an event (already complete on CPU).
            return_recv_hook: return right after launching the send; calling the hook waits and
                fills the returned tensors in place (exclusive with ``async_finish``).

        Returns:
            recv_x: ``[L, W*M, H]`` (x's dtype), or with ``use_fp8`` the tuple ``(e4m3 [L, W*M, H],
                scales)``: float32 ``[L, W*M, H/128]`` or int32 ``[L, W*M, H/512]`` (UE8M0),
                strides ``(S*W*M, 1, W*M)`` (token dimension contiguous, as DeepEP). Slots
                ``[0, recv_count[l])`` are valid, each source rank's tokens one contiguous block,
                blocks in rank order, tokens in source order; later slots are uninitialised.
            recv_count: ``[L] int32`` (token, k) entries that chose each local expert.
            handle: :class:`~flexep.low_latency.LowLatencyHandle`, DeepEP's 5-tuple
                ``(recv_src_info [L, W*M] int32, recv_layout_range [L, W] int64 (count low 32
                bits, start slot high 32 bits), M, H, E)``.
            event: ``EventOverlap``. hook: a callable with ``return_recv_hook``, else None.
        """
        self._require_low_latency("low_latency_dispatch")
        tp = self._tp("ll_dispatch")
        error = None
        try:
            V.check_tensor("x", x, dim=2, dtypes=V.FLOAT_DTYPES)
            V.check_num_experts(num_experts, self.group_size)
            topk_idx = V.check_topk_idx(topk_idx, x.size(0), num_experts, values=self.validate)
            self._check_ll_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                    cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats,
                                    use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook)
        except (TypeError, ValueError) as exc:
            error = exc
        mode = int(bool(use_fp8)) | int(bool(round_scale)) << 1 | int(bool(use_ue8m0)) << 2
        self._agreement_round(tp, "ll_dispatch", error, lambda: dict(
            hidden=x.size(1), x_dtype=dtype_code(x.dtype), num_experts=num_experts,
            num_topk=topk_idx.size(1), capacity=num_max_dispatch_tokens_per_rank, mode=mode,
            num_tokens=x.size(0)))
        stats = cumulative_local_expert_recv_stats
        on_done = None if stats is None else (lambda out: stats.add_(out.recv_count.to(stats.dtype)))
        pending, index = low_latency.dispatch_send(tp, x, topk_idx, num_max_dispatch_tokens_per_rank,
                                                   num_experts, use_fp8, round_scale, use_ue8m0, on_done)
        out = pending.out
        handle = low_latency.LowLatencyHandle(
            recv_src_info=out.recv_src_info(), recv_layout_range=out.layout_range,
            num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank, hidden=x.size(1),
            num_experts=num_experts, send_index=index, recv_slot=out.recv_slot, topk_idx=topk_idx,
            num_ranks=self.group_size, buffer_uid=self.uid, pending=pending)
        recv_x = out.recv_x()
        hook = pending.finish if return_recv_hook else None
        if not return_recv_hook:
            pending.finish()
        held = [x, topk_idx, out.recv_count, *(recv_x if isinstance(recv_x, tuple) else (recv_x,))]
        return recv_x, out.recv_count, handle, self._event(async_finish, held), hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: low_latency.LowLatencyHandle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, EventOverlap, Optional[Callable[[], None]]]:
        """Weighted sum of each token's expert outputs, back on the token's rank.

        Args:
            x: ``[L, W*M, H]`` bf16 (fp16/fp32 accepted), expert outputs in the slot layout the
                dispatch returned; only valid slots are read. Ignored (shape still checked) with
                ``zero_copy``, which reads :meth:`get_next_low_latency_combine_buffer` instead.
            topk_idx: ``[T, K] int64``, the routing this rank dispatched (checked equal when
                ``validate``). topk_weights: ``[T, K] float32``.
            handle: from :meth:`low_latency_dispatch`.
            use_logfmt: not supported (``ValueError`` if True); combine sends x's dtype.
            async_finish, return_recv_hook: as in :meth:`low_latency_dispatch`.
            out: optional ``[T, H]`` tensor of x's dtype, written in place and returned.
            combine_wait_recv_cost_stats: optional ``[W] int64``; accepted, left unchanged.

        Returns:
            combined_x: ``[T, H]`` x's dtype, ``sum_k topk_weights[t, k] * y(topk_idx[t, k], t)``
                over slots with ``topk_idx >= 0`` (zeros if none), accumulated in float32.
            event: ``EventOverlap``. hook: a callable with ``return_recv_hook``, else None.
        """
        self._require_low_latency("low_latency_combine")
        tp = self._tp("ll_combine")
        error, source = None, None
        try:
            source = self._check_ll_combine(x, topk_idx, topk_weights, handle, use_logfmt, zero_copy,
                                            async_finish, return_recv_hook, out,
                                            combine_wait_recv_cost_stats)
        except (TypeError, ValueError) as exc:
            error = exc
        self._agreement_round(tp, "ll_combine", error, lambda: dict(
            hidden=handle.hidden, x_dtype=dtype_code(x.dtype), num_experts=handle.num_experts,
            num_topk=topk_idx.size(1), capacity=handle.num_max_dispatch_tokens_per_rank,
            num_tokens=handle.num_tokens))
        if out is None:
            out = torch.empty(handle.num_tokens, handle.hidden, dtype=x.dtype, device=x.device)
        pending = low_latency.combine_send(tp, source, topk_weights, handle, out)
        hook = pending.finish if return_recv_hook else None
        if not return_recv_hook:
            pending.finish()
        return out, self._event(async_finish, [x, topk_idx, topk_weights, out]), hook

    def get_next_low_latency_combine_buffer(self, handle: low_latency.LowLatencyHandle) -> torch.Tensor:
        """The ``[L, W*M, H]`` bf16 tensor ``low_latency_combine(..., zero_copy=True)`` reads.

        Write the expert outputs into it (slot layout of ``handle``) instead of passing them as
        ``x``. It is contiguous (DeepEP's is a strided view), kept by this ``Buffer`` and reused
        for every handle of the same shape; combine has read it by the time it returns (even
        with a receive hook), so it may be refilled right after.
        """
        self._require_low_latency("get_next_low_latency_combine_buffer")
        self._check_ll_handle(handle)
        shape = (handle.num_local_experts, handle.num_ranks * handle.num_max_dispatch_tokens_per_rank,
                 handle.hidden)
        device = handle.recv_src_info.device
        buf = self._ll_state
        if buf is None or tuple(buf.shape) != shape or buf.device != device:
            buf = torch.empty(shape, dtype=torch.bfloat16, device=device)
            self._ll_state = buf
        return buf

    def _require_low_latency(self, what: str) -> None:
        if not self.low_latency_mode:
            raise ValueError(f"{what} needs a Buffer created with low_latency_mode=True "
                             "(this one has low_latency_mode=False)")

    def _check_ll_size(self, capacity: int, hidden: int, num_experts: int) -> None:
        """Capacity and ``num_rdma_bytes`` against DeepEP's size hint (never truncate)."""
        V.check_int("num_max_dispatch_tokens_per_rank", capacity, minimum=1)
        V.check_num_experts(num_experts, self.group_size)
        need = low_latency.rdma_size_hint(capacity, hidden, self.group_size, num_experts)
        if self.num_rdma_bytes < need:
            raise CapacityError(
                f"num_rdma_bytes ({self.num_rdma_bytes}) is smaller than the {need} bytes low-latency "
                f"mode needs for num_max_dispatch_tokens_per_rank={capacity}, hidden={hidden}, "
                f"num_experts={num_experts}; create the Buffer with num_rdma_bytes="
                "Buffer.get_low_latency_rdma_size_hint(...)", op="low_latency")

    def _check_ll_dispatch(self, x, topk_idx, capacity, num_experts, recv_stats, wait_stats,
                           use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook) -> None:
        self._check_ll_size(capacity, x.size(1), num_experts)
        if x.size(0) > capacity:
            raise CapacityError(
                f"x has {x.size(0)} tokens, more than num_max_dispatch_tokens_per_rank ({capacity}); "
                "raise num_max_dispatch_tokens_per_rank (equal on all ranks) or split the batch",
                op="low_latency_dispatch")
        if async_finish and return_recv_hook:
            raise ValueError("async_finish=True and return_recv_hook=True are mutually exclusive")
        if use_ue8m0 and not round_scale:
            raise ValueError("use_ue8m0=True requires round_scale=True")
        multiple = 512 if use_fp8 and use_ue8m0 else 128 if use_fp8 else 1
        if x.size(1) % multiple:
            raise ValueError(f"x: hidden ({x.size(1)}) must be a multiple of {multiple} for this "
                             "FP8 mode (per-128-channel scales, 4 per int32 with UE8M0)")
        local = num_experts // self.group_size
        if recv_stats is not None:
            V.check_tensor("cumulative_local_expert_recv_stats", recv_stats, dim=1,
                           dtypes=(torch.int32, torch.int64), rows=local)
        if wait_stats is not None:
            V.check_tensor("dispatch_wait_recv_cost_stats", wait_stats, dim=1, dtypes=(torch.int64,),
                           rows=self.group_size)

    def _check_ll_combine(self, x, topk_idx, topk_weights, handle, use_logfmt, zero_copy,
                          async_finish, return_recv_hook, out, wait_stats) -> torch.Tensor:
        """Checks combine's inputs; returns the tensor holding the expert outputs."""
        if use_logfmt:
            raise ValueError("use_logfmt=True (DeepEP's lossy LogFMT combine) is not supported by "
                             "flexep; pass use_logfmt=False (combine sends x's dtype)")
        if async_finish and return_recv_hook:
            raise ValueError("async_finish=True and return_recv_hook=True are mutually exclusive")
        self._check_ll_handle(handle)
        shape = (handle.num_local_experts, handle.num_ranks * handle.num_max_dispatch_tokens_per_rank,
                 handle.hidden)
        V.check_tensor("x", x, dim=3, dtypes=V.FLOAT_DTYPES, contiguous=not zero_copy)
        if tuple(x.shape) != shape:
            raise ValueError(f"x must be {list(shape)} (the dispatch's [L, W*M, H]), got {list(x.shape)}")
        num_tokens = handle.num_tokens
        V.check_topk_idx(topk_idx, num_tokens, handle.num_experts, values=False)
        V.check_topk_weights(topk_weights, topk_idx)
        if topk_idx.shape != handle.topk_idx.shape or (
                self.validate and not torch.equal(topk_idx.to(torch.int64), handle.topk_idx)):
            raise ValueError("topk_idx must be the routing this rank dispatched with (the handle's "
                             f"{list(handle.topk_idx.shape)} topk_idx), got a different one")
        if out is not None:
            V.check_tensor("out", out, dim=2, dtypes=(x.dtype,), rows=num_tokens)
            if out.size(1) != handle.hidden:
                raise ValueError(f"out must be [{num_tokens}, {handle.hidden}], got {list(out.shape)}")
        if wait_stats is not None:
            V.check_tensor("combine_wait_recv_cost_stats", wait_stats, dim=1, dtypes=(torch.int64,),
                           rows=self.group_size)
        if not zero_copy:
            return low_latency.aligned(x)
        buf = self._ll_state
        if buf is None or tuple(buf.shape) != shape or buf.device != x.device:
            raise ValueError("zero_copy=True reads get_next_low_latency_combine_buffer(handle): call it "
                             "and write the expert outputs into it first")
        return buf

    def _check_ll_handle(self, handle) -> None:
        if not isinstance(handle, low_latency.LowLatencyHandle):
            raise TypeError("handle must be the handle returned by Buffer.low_latency_dispatch, got "
                            f"{type(handle).__name__}")
        if handle.buffer_uid != self.uid:
            raise ValueError("handle was produced by another Buffer; low_latency_combine must use the "
                             "Buffer that dispatched")
        if not handle.received:
            raise ValueError("the dispatch of this handle ran with return_recv_hook=True and its hook "
                             "has not been called yet; call it before combining")

    # ---- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _unpack_bias(bias) -> tuple:
        if bias is None:
            return ()
        if isinstance(bias, torch.Tensor):
            return (bias,)
        if isinstance(bias, (tuple, list)) and len(bias) == 2:
            return tuple(b for b in bias if b is not None)
        raise TypeError(f"bias must be None, a tensor or a pair of tensors, got {type(bias).__name__}")

    def _config(self, config, default) -> Config:
        if config is None:
            return default(self.group_size)
        if not isinstance(config, Config):
            raise TypeError(f"config must be a flexep.Config, got {type(config).__name__}")
        return config

    def _check_handle(self, handle) -> None:
        if not isinstance(handle, normal.NormalHandle):
            raise TypeError(f"handle must be the handle returned by Buffer.dispatch, got "
                            f"{type(handle).__name__}")
        if handle.buffer_uid != self.uid:
            raise ValueError("handle was produced by another Buffer; combine and cached dispatch "
                             "must use the Buffer that dispatched")

    @staticmethod
    def _agree(data, scales, num_experts, topk_idx) -> dict:
        """Header fields that must be equal on every rank."""
        return dict(hidden=data.size(1), x_dtype=dtype_code(data.dtype),
                    num_scales=scales.size(1) if scales is not None else -1,
                    scale_dtype=dtype_code(scales.dtype if scales is not None else None),
                    num_experts=num_experts,
                    num_topk=topk_idx.size(1) if topk_idx is not None else -1)

    def _agreement_round(self, tp: Transport, op: str, error: Optional[BaseException],
                         values: Callable[[], dict]) -> None:
        """The header round of a call that needs no counts, if ``check_consistency`` is on.

        ``values()`` gives the fields that must agree (only called without a local ``error``).
        Without the round a local input error is raised here, on this rank only: a header round
        run by this rank alone would meet a peer's payload exchange (mismatched collectives can
        abort Gloo); the peers then time out naming this rank.
        """
        if not self.check_consistency:
            if error is not None:
                raise error
            return
        header_round(tp, op, error=error, check=True, **({} if error else values()))

    def _normal_algorithm(self):
        return hierarchical if self.hierarchical else normal

    def _algo_kwargs(self, header) -> dict:
        if not self.hierarchical:
            return {}
        return {"groups": self._topo_groups, "node_counts": header.extra}

    def _fill_minimum(self, handle, row_bytes: int, reverse: bool = False, cached: bool = False) -> None:
        """Record the routing's minimum bytes per link class next to what was sent."""
        self.runtime.stats.minimum = minimum_bytes(handle, self.topology, self.rank, row_bytes,
                                                   reverse, cached)


def _resolve_timeout(timeout) -> float:
    """``timeout`` checked, or ``FLEXEP_TIMEOUT`` / 100 s when None."""
    if timeout is None:
        timeout = float(os.environ.get("FLEXEP_TIMEOUT", "100"))
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _check_worst_tokens(tp: Transport, header) -> None:
    """Raise on every rank if any rank receives more tokens than its ``num_worst_tokens``.

    Each rank's ``num_worst_tokens`` travels in the header, so all ranks see the overflow and
    none of them starts a payload exchange the overflowing rank would then leave hanging.
    """
    worst = header.field("num_worst_tokens")
    received = header.counts.sum(0).tolist()
    over = [r for r, (w, n) in enumerate(zip(worst, received)) if w > 0 and n > w]
    if over:
        detail = ", ".join(f"rank {r} receives {received[r]} > num_worst_tokens {worst[r]}" for r in over)
        raise CapacityError(f"num_worst_tokens is too small: {detail}; expected num_worst_tokens >= "
                            "the tokens a rank receives (at most num_tokens * num_ranks)",
                            op="dispatch", phase="header", seq=tp.seq, ranks=over)


def _row_bytes(data: torch.Tensor, scales: Optional[torch.Tensor], topk: Optional[torch.Tensor]) -> int:
    """Bytes one token row carries: data, scales, and top-k ids (8 B) + weights (4 B) per slot."""
    row = data.size(1) * data.element_size()
    if scales is not None:
        row += scales.size(1) * scales.element_size()
    if topk is not None:
        row += topk.size(1) * (12 if topk.dtype == torch.int64 else 4)
    return row
