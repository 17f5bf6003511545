"""The core API: an expert-parallel communicator over one process group.

:class:`Communicator` is what every face is built on (DeepEP's V1 ``Buffer``, DeepEP V2's
``EPBuffer``, :mod:`flexep.autograd`, :class:`flexep.moe.MoELayer`): frozen requests in
(:mod:`flexep.algorithms.contract`), frozen results and typed handles out. Each call:

1. builds and checks its request locally (structure always; values on the device, see
   :mod:`flexep.core.checks`). A request may be given as a callable that builds it, so that
   errors raised while building it (a face's own argument checks) are reported collectively
   too;
2. runs one control round (:mod:`flexep.comm.control`): a bad input, a mismatched argument or a
   skipped call on *any* rank raises on *every* rank, and the routing counts arrive;
3. hands the request to its algorithm object (flat or hierarchical, low-latency), which moves
   data through the transport under one deadline;
4. records the bytes sent next to the routing's minimum (:mod:`flexep.comm.accounting`).

Construction is collective over the group's members only (subgroups are created with
``use_local_synchronization``), so an EP group that is part of a larger world needs nothing
from the other ranks.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

from ..algorithms import logfmt
from ..algorithms.contract import (
    CachedDispatchRequest,
    Combined,
    CombineRequest,
    Dispatched,
    DispatchRequest,
    LLCombineRequest,
    LLDispatchRequest,
    LowLatencyHandle,
    NormalHandle,
    Sends,
    SyncFreeCachedRequest,
    SyncFreeCombineRequest,
    SyncFreeDispatchRequest,
    SyncFreeHandle,
)
from ..algorithms.flat import Flat
from ..algorithms.hierarchical import Hierarchical
from ..algorithms.ll_shrink import ShrinkLink
from ..algorithms.low_latency import LowLatency, WeightsRow, WireRow
from ..algorithms.slot_combine import SlotCombine
from ..algorithms.sync_free import SyncFree, wire_row_bytes_sync_free
from ..comm.accounting import flat_minimum, hierarchical_minimum, wire_row_bytes
from ..comm.control import ControlPlane, Header, dtype_code
from ..comm.failure import FailureDetector
from ..comm.topology import Topology, build_topology_groups, resolve_ranks_per_node, subgroup
from ..comm.transport import Transport
from ..device import group_carries
from ..errors import CapacityError
from ..layout import DispatchLayout, aligned_expert_counts, compute_layout
from . import checks as C
from . import ll_agreement

__all__ = ["Options", "Communicator"]

Requested = Union[object, Callable[[], object]]


@dataclass(frozen=True)
class Options:
    """How a :class:`Communicator` runs (every rank must pass the same).

    Attributes:
        ranks_per_node: node shape for hierarchical exchange (default: ``FLEXEP_RANKS_PER_NODE``,
            torchrun's ``LOCAL_WORLD_SIZE``, else the ranks' host names). Smaller values make
            "virtual nodes" on one machine.
        hierarchical: use the two-hop algorithm when the group spans several nodes.
        num_channels: split every exchange into this many concurrent channels (own groups).
        timeout: seconds a call may wait in total (default ``FLEXEP_TIMEOUT`` or 100).
        check_consistency: run the cross-rank agreement checks in calls that need no counts.
        validate: check tensor contents. ``None`` (default): in normal mode on every device
            (folded into the control round, no extra host read) and in low-latency mode for
            host tensors; ``True`` also in low-latency mode on accelerators (one host read per
            call); ``False`` never.
        verify: checksum every exchange (default ``FLEXEP_VERIFY``).
        generation: membership generation this communicator belongs to (:mod:`flexep.elastic`
            sets it for the group it forms); every control row carries it and rows of another
            generation raise :class:`~flexep.errors.StaleGenerationError` on every rank.
    """

    ranks_per_node: Optional[int] = None
    hierarchical: bool = True
    num_channels: int = 1
    timeout: Optional[float] = None
    check_consistency: bool = True
    validate: Optional[bool] = None
    verify: Optional[bool] = None
    generation: int = 0


def resolve_timeout(timeout) -> float:
    """``timeout`` checked, or ``FLEXEP_TIMEOUT`` / 100 s when None."""
    if timeout is None:
        timeout = float(os.environ.get("FLEXEP_TIMEOUT", "100"))
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


class Communicator:
    """Dispatch and combine over ``group`` (collective: every rank of it constructs one).

    Args:
        group: the EP process group (NCCL, HCCL, XCCL, Gloo, or any backend moving the call's
            tensors). An accelerator-only group gets a CPU (Gloo) side group for control rows
            that must not touch the device.
        options: :class:`Options`.
        agree: extra ``name -> int`` values every rank must pass equally (a face's own
            construction arguments); a disagreement raises ``ValueError`` on every rank.
        error: a construction error found by the face; shipped so every rank raises.
        label: how errors name the object (``"Buffer"`` for the DeepEP face).
        fault_hook: test-only callable invoked with a phase name at each phase boundary.
    """

    def __init__(self, group: dist.ProcessGroup, options: Options = Options(), *,
                 agree: Optional[dict] = None, error: Optional[BaseException] = None,
                 label: str = "Communicator", fault_hook: Optional[Callable[[str], None]] = None) -> None:
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
        self.group = group
        self.rank, self.world = group.rank(), group.size()
        num_channels, timeout = 1, resolve_timeout(None)
        try:
            C.check_int("num_channels", options.num_channels, minimum=1)
            num_channels, timeout = options.num_channels, resolve_timeout(options.timeout)
        except (TypeError, ValueError) as exc:
            error = error or exc
        verify = options.verify
        if verify is None:
            verify = os.environ.get("FLEXEP_VERIFY", "0") not in ("", "0")
        self.options = options
        self.check_consistency = bool(options.check_consistency)
        self.validate = options.validate
        # Control rows that must not touch the device go over the host; an accelerator-only
        # group cannot move CPU tensors, so it gets a Gloo side group over the same ranks.
        self.host_group = None if group_carries(group, "cpu") else subgroup(group, list(range(self.world)),
                                                                            backend="gloo")
        try:
            rpn = resolve_ranks_per_node(group, options.ranks_per_node, self.host_group)
            self.topology = Topology(self.world, rpn)
        except (TypeError, ValueError) as exc:
            error, self.topology = error or exc, Topology(self.world, self.world)
        self.hierarchical = bool(options.hierarchical) and self.topology.is_multi_node
        global_ranks = dist.get_process_group_ranks(group)
        store_host = global_ranks.index(0) if 0 in global_ranks else None
        tp = Transport(group, self.topology, timeout, verify=bool(verify), fault_hook=fault_hook)
        control = ControlPlane(tp, self.host_group, generation=int(options.generation))
        # One round before any group is created: a shared id (names the store keys) and a check
        # that every rank built it the same way. new_group waits for all members, so ranks
        # creating different numbers of groups would otherwise block instead of raising.
        agree = dict(agree or {})
        values = [random.getrandbits(62), self.topology.ranks_per_node, num_channels,
                  int(self.hierarchical), *agree.values()]
        tp.begin("init")
        control.extra_width = len(values)
        header = control.round("init", error=error, check=False, extra=torch.tensor(values))
        for col, name in enumerate(("ranks_per_node", "num_channels", "hierarchical", *agree), start=1):
            column = header.extra[:, col].tolist()
            if len(set(column)) > 1:
                raise ValueError(f"{label}: ranks disagree on {name}: {column}; every rank must "
                                 "construct with the same value")
        self.uid = int(header.extra[0, 0])
        tp.detector = FailureDetector(self.uid, self.rank, self.world, store_host)
        lanes: dict = {"ep": [subgroup(group, list(range(self.world))) for _ in range(num_channels - 1)]}
        if self.hierarchical:
            groups = build_topology_groups(group, self.topology)
            extra = [build_topology_groups(group, self.topology) for _ in range(num_channels - 1)]
            lanes["intra"], lanes["rail"] = [g.intra for g in extra], [g.rail for g in extra]
            self.normal = Hierarchical(tp, groups, self.uid)
        else:
            self.normal = Flat(tp, self.uid)
        tp.channels = lanes
        self.low_latency = LowLatency(tp, self.uid)
        self.sync_free, self.slot_combine = SyncFree(tp, self.uid), SlotCombine(tp, self.uid)
        self.num_channels = num_channels
        self._tp: Optional[Transport] = tp
        # Every later round carries the algorithm's extras and per-destination expert counts
        # (their width grows, agreed, on the first dispatch with more local experts).
        control.extra_width, control.per_dest_width = self.normal.extra_width, 0
        self.control = control
        self.in_band = ll_agreement.InBand(control)

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def transport(self) -> Transport:
        if self._tp is None:
            raise RuntimeError("this communicator was destroyed; create a new one")
        return self._tp

    def destroy(self) -> None:
        """Release the communicator's state (never blocks on peers)."""
        self._tp = None

    @property
    def alive(self) -> bool:
        return self._tp is not None

    def ensure_alive(self) -> None:
        """Raise ``RuntimeError`` if the communicator was destroyed."""
        self.transport  # noqa: B018 - the property raises once destroyed

    @property
    def last_traffic(self):
        """:class:`~flexep.comm.accounting.TrafficStats` of this rank's last call."""
        return self.transport.stats

    def _begin(self, op: str) -> Transport:
        tp = self.transport
        tp.begin(op)
        return tp

    @staticmethod
    def _build(request: Requested, check: Callable[[object], None]):
        """``(request, None)`` or ``(None, error)`` for a request or a builder callable."""
        try:
            req = request() if callable(request) else request
            check(req)
            return req, None
        except (TypeError, ValueError) as exc:
            return None, exc

    def _agreement(self, op: str, error: Optional[BaseException], values: Callable[[], dict]) -> None:
        """The control round of a call that needs no counts, if ``check_consistency`` is on.

        Without the round a local input error is raised here, on this rank only: a round run by
        this rank alone would meet a peer's payload exchange; the peers then time out naming
        this rank.
        """
        if not self.check_consistency:
            if error is not None:
                raise error
            return
        self.control.round(op, error=error, check=True, **({} if error else values()))

    # ---- normal mode -----------------------------------------------------------------------
    def layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        """Counts and masks for dispatching ``topk_idx: [T, K] int64`` (local, no communication)."""
        self.ensure_alive()
        C.check_num_experts(num_experts, self.world)
        C.check_topk_idx(topk_idx, None, num_experts, values=False)
        topk_idx = C.check_topk_idx(topk_idx, None, num_experts, values=self._validate_now(topk_idx))
        per = self.topology.ranks_per_node if self.topology.is_multi_node else None
        return compute_layout(topk_idx, num_experts, self.world, per)

    def _validate_now(self, t: torch.Tensor) -> bool:
        """Whether a host-side value check runs for ``t`` (free on the host, asked for elsewhere)."""
        return self.validate is True or (self.validate is None and t.device.type == "cpu")

    def check_dispatch(self, req: DispatchRequest) -> None:
        """Structure checks of a dispatch request (raises ``TypeError``/``ValueError``)."""
        if not isinstance(req, DispatchRequest):
            raise TypeError(f"expected a DispatchRequest, got {type(req).__name__}")
        C.check_dispatch(req, self.world)

    def dispatch(self, request: Requested) -> Dispatched:
        """Send every token to the ranks holding its experts (see :class:`DispatchRequest`)."""
        tp = self._begin("dispatch")
        req, error = self._build(request, self.check_dispatch)
        algo = self.normal
        world, rank = self.world, self.rank
        send_counts = extra = per_dest = flags = None
        width = self.control.per_dest_width
        if req is not None:
            send_counts = req.is_token_in_rank.sum(0)
            extra = algo.extra(req)
            local = req.num_experts // world
            if local <= width:
                per_dest = req.num_tokens_per_expert.view(world, local)
            if self.validate is not False:
                flags = C.dispatch_value_flags(req)
        staged: list = []
        early = req is not None and req.device.type == "cpu"
        if early:  # counts are on the host already: build the send rows during the round
            sends = Sends(send_counts.tolist(), extra.tolist() if extra is not None else [])

            def meanwhile() -> None:
                staged.append(algo.stage(req, sends))
        header = self.control.round(
            "dispatch", device=req.device if req is not None else None, error=error,
            check=self.check_consistency, send_counts=send_counts, extra=extra, per_dest=per_dest,
            bad_values=flags,
            explain=lambda: C.explain_dispatch_values(req), meanwhile=meanwhile if early else None,
            **({} if error else _agree_dispatch(req)), num_tokens=req.num_tokens if req else 0,
            num_worst_tokens=req.num_worst_tokens if req else 0)
        _check_worst_tokens(tp, header)
        local = req.num_experts // world
        # Decided from every rank's num_experts (in the header), so all ranks decide alike even
        # when check_consistency=False lets a disagreement through.
        widest = max(e // world for e in header.field("num_experts"))
        if widest <= width:
            per_expert = header.per_dest[:, :local].sum(0).tolist()
        else:  # first call with this many local experts: one more small round, then they ride along
            per_expert = self._exchange_expert_counts(tp, req, local, widest)
            self.control.per_dest_width = widest
        expert_counts = [] if req.num_worst_tokens else aligned_expert_counts(per_expert,
                                                                               req.expert_alignment)
        if not early:
            staged.append(algo.stage(req, Sends(header.counts[rank].tolist(), header.extra[rank].tolist())))
        out = algo.dispatch(req, staged[0], header, expert_counts)
        topk = req.topk_idx.size(1) if req.topk_idx is not None else 0
        row = wire_row_bytes(req.x.size(1), req.x.dtype, scales=_scale_spec(req.scales), topk_ids=topk,
                             topk_weights=topk, src_index=True)
        mask = self.topology.ranks_per_node if self.hierarchical and req.topk_idx is None else 0
        self._set_minimum(header, row, reverse=False, mask=mask)
        return out

    def _exchange_expert_counts(self, tp: Transport, req: DispatchRequest, local: int, width: int) -> list:
        send = torch.zeros(self.world, width, dtype=torch.int64, device=req.device)
        send[:, :local] = req.num_tokens_per_expert.view(self.world, local)
        recv = torch.empty_like(send)
        tp.all_to_all("expert_counts", [send], [recv], [1] * self.world, [1] * self.world, payload=False)
        return recv[:, :local].sum(0).tolist()

    def check_cached(self, req: CachedDispatchRequest) -> None:
        if not isinstance(req, CachedDispatchRequest):
            raise TypeError(f"expected a CachedDispatchRequest, got {type(req).__name__}")
        self.check_handle(req.handle)
        C.check_cached(req)

    def cached_dispatch(self, request: Requested) -> Dispatched:
        """Dispatch new rows along an earlier dispatch's routing (no counts round)."""
        self._begin("cached_dispatch")
        req, error = self._build(request, self.check_cached)
        self._agreement("cached_dispatch", error, lambda: _agree_rows(req.x, req.scales))
        out = self.normal.cached_dispatch(req)
        row = wire_row_bytes(req.x.size(1), req.x.dtype, scales=_scale_spec(req.scales))
        self._set_minimum(req.handle, row, reverse=False)
        return out

    def check_combine(self, req: CombineRequest) -> None:
        if not isinstance(req, CombineRequest):
            raise TypeError(f"expected a CombineRequest, got {type(req).__name__}")
        self.check_handle(req.handle)
        if req.slot_order is None:
            C.check_combine(req)
        else:
            C.check_slot_combine(req, self.world)

    def combine(self, request: Requested) -> Combined:
        """Return every received row to its source and sum per original token (in rank order, or
        in DeepEP V2's slot order when the request has a ``slot_order``)."""
        self._begin("combine")
        req, error = self._build(request, self.check_combine)
        self._agreement("combine", error, lambda: dict(
            hidden=req.x.size(1), x_dtype=dtype_code(req.x.dtype),
            has_weights=int(req.topk_weights is not None), mode=int(req.slot_order is not None)))
        out = (self.normal if req.slot_order is None else self.slot_combine).combine(req)
        k = req.topk_weights.size(1) if req.topk_weights is not None else 0
        self._set_minimum(req.handle, wire_row_bytes(req.x.size(1), req.x.dtype, topk_weights=k),
                          reverse=True)
        return out

    def check_handle(self, handle) -> None:
        if not isinstance(handle, NormalHandle):
            raise TypeError(f"handle must be the handle a dispatch returned, got {type(handle).__name__}")
        if handle.owner != self.uid:
            raise ValueError("handle was produced by another Buffer/communicator; combine and cached "
                             "dispatch must use the one that dispatched")

    def _set_minimum(self, source: Union[Header, NormalHandle], row: int, reverse: bool,
                     mask: int = 0) -> None:
        """The routing's minimum for this call, from its count matrix (evaluated on demand)."""
        topo, rank = self.topology, self.rank
        counts = source.counts
        if self.hierarchical:
            node_counts = source.extra if isinstance(source, Header) else source.route.node_counts
            self.transport.stats.set_minimum(lambda: hierarchical_minimum(
                counts, node_counts, topo, rank, row, reverse=reverse, mask_bytes=mask))
        else:
            self.transport.stats.set_minimum(lambda: flat_minimum(counts, topo, rank, row, reverse))

    # ---- sync-free normal mode (DeepEP V2 do_cpu_sync=False) -------------------------------
    def check_sync_free(self, req: SyncFreeDispatchRequest) -> None:
        if not isinstance(req, SyncFreeDispatchRequest):
            raise TypeError(f"expected a SyncFreeDispatchRequest, got {type(req).__name__}")
        C.check_sync_free(req, self.world)
        if self._validate_now(req.topk_idx):
            C.check_topk_values(req.topk_idx, req.num_experts)

    def sync_free_dispatch(self, request: Requested) -> Dispatched:
        """Dispatch with static shapes (``W * Q`` output rows) and no host read: every count
        stays on the device (``Dispatched.handle`` is a :class:`SyncFreeHandle`). The control
        round carries host values only (sizes, dtypes), over the host plane; with
        ``check_consistency=False`` there is none and each source sends Q rows."""
        self._begin("sync_free_dispatch")
        req, error = self._build(request, self.check_sync_free)
        blocks = None
        if self.check_consistency or error is not None:
            header = self.control.round("sync_free_dispatch", error=error, check=self.check_consistency,
                                        **({} if error else _agree_sync_free(req)))
            blocks = header.field("num_tokens")
        out = self.sync_free.dispatch(req, blocks or [req.capacity] * self.world)
        k = req.topk_idx.size(1)
        row = wire_row_bytes_sync_free(req.x.size(1), req.x.dtype, _num_scales(req.scales), k,
                                       req.topk_weights is not None)
        self._set_ll_minimum(req.topk_idx, req.num_experts, row)
        return out

    def check_sync_free_handle(self, handle) -> None:
        if not isinstance(handle, SyncFreeHandle):
            raise TypeError("handle must be the handle a sync-free dispatch returned, got "
                            f"{type(handle).__name__}")
        if handle.owner != self.uid:
            raise ValueError("handle was produced by another Buffer/communicator; combine and cached "
                             "dispatch must use the one that dispatched")

    def check_sync_free_cached(self, req: SyncFreeCachedRequest) -> None:
        if not isinstance(req, SyncFreeCachedRequest):
            raise TypeError(f"expected a SyncFreeCachedRequest, got {type(req).__name__}")
        self.check_sync_free_handle(req.handle)
        C.check_sync_free_cached(req)

    def sync_free_cached_dispatch(self, request: Requested) -> Dispatched:
        """Replay a sync-free dispatch's routing for new rows (static shapes, no host read)."""
        self._begin("sync_free_cached_dispatch")
        req, error = self._build(request, self.check_sync_free_cached)
        self._agreement("sync_free_cached_dispatch", error, lambda: dict(
            **_agree_rows(req.x, req.scales), has_weights=int(req.topk_weights is not None)))
        out = self.sync_free.cached_dispatch(req)
        h = req.handle
        k = h.topk_idx.size(1) if req.topk_weights is not None else 0
        row = wire_row_bytes_sync_free(req.x.size(1), req.x.dtype, _num_scales(req.scales), 0, False) + 4 * k
        self._set_ll_minimum(h.topk_idx, h.num_experts, row)
        return out

    def check_sync_free_combine(self, req: SyncFreeCombineRequest) -> None:
        if not isinstance(req, SyncFreeCombineRequest):
            raise TypeError(f"expected a SyncFreeCombineRequest, got {type(req).__name__}")
        self.check_sync_free_handle(req.handle)
        C.check_sync_free_combine(req, self.world)

    def sync_free_combine(self, request: Requested) -> Combined:
        """Return rows along a sync-free handle and reduce them in DeepEP V2's slot order."""
        self._begin("sync_free_combine")
        req, error = self._build(request, self.check_sync_free_combine)
        self._agreement("sync_free_combine", error, lambda: dict(
            hidden=req.x.size(1), x_dtype=dtype_code(req.x.dtype),
            has_weights=int(req.topk_weights is not None)))
        out = self.sync_free.combine(req)
        k = req.topk_weights.size(1) if req.topk_weights is not None else 0
        row = req.x.size(1) * req.x.element_size() + 4 * k
        topo, rank, handle = self.topology, self.rank, req.handle
        self.transport.stats.set_minimum(lambda: _per_peer(topo, rank, handle.recv_counts.cpu(), row))
        return out

    # ---- low-latency mode ------------------------------------------------------------------
    def check_ll_dispatch(self, req: LLDispatchRequest) -> None:
        if not isinstance(req, LLDispatchRequest):
            raise TypeError(f"expected an LLDispatchRequest, got {type(req).__name__}")
        C.check_ll_dispatch(req, self.world)
        if self._validate_now(req.topk_idx):
            C.check_topk_values(req.topk_idx, req.num_experts)

    def ll_dispatch(self, request: Requested):
        """Launch a fixed-capacity dispatch; returns ``(pending, handle)`` (``pending.finish()``
        receives). Never reads the device on the host (with the default ``validate``)."""
        self._begin("ll_dispatch")
        req, error = self._build(request, self.check_ll_dispatch)
        values = (lambda: _ll_dispatch_values(req))
        if self.shrink:
            if error is not None:
                raise error
            pending, handle = self.low_latency.dispatch(req)
        elif self._ll_in_band:
            frame = None
            if req is not None:
                row = WireRow.of(req.x.size(1), req.topk_idx.size(1), req.x.dtype, req.use_fp8,
                                 req.use_ue8m0, header=True)
                frame = (req.capacity, row.nbytes, row.header_offset)
            pending, handle = self.in_band.call(
                self, "ll_dispatch", error, values, frame,
                lambda h, v: self.low_latency.dispatch(req, header=h, verify=v))
        else:
            self._agreement("ll_dispatch", error, values)
            pending, handle = self.low_latency.dispatch(req)
        row = WireRow.of(req.x.size(1), req.topk_idx.size(1), req.x.dtype, req.use_fp8, req.use_ue8m0).nbytes
        self._set_ll_minimum(req.topk_idx, req.num_experts, row)
        return pending, handle

    def check_ll_combine(self, req: LLCombineRequest) -> None:
        if not isinstance(req, LLCombineRequest):
            raise TypeError(f"expected an LLCombineRequest, got {type(req).__name__}")
        self.check_ll_handle(req.handle)
        C.check_ll_combine(req)

    def ll_combine(self, request: Requested):
        """Launch a fixed-capacity weighted combine; returns the pending half."""
        self._begin("ll_combine")
        req, error = self._build(request, self.check_ll_combine)
        values = (lambda: _ll_combine_values(req))
        if self.shrink:
            if error is not None:
                raise error
            pending = self.low_latency.combine(req, use_logfmt=req.use_logfmt)
        elif self._ll_in_band:
            frame = None
            if req is not None:
                wrow = WeightsRow(req.topk_weights.size(1), header=True)
                frame = (req.handle.num_max_dispatch_tokens_per_rank, wrow.nbytes, wrow.header_offset)
            pending = self.in_band.call(self, "ll_combine", error, values, frame, lambda h, v:
                                        self.low_latency.combine(req, header=h, verify=v,
                                                                 use_logfmt=req.use_logfmt))
        else:
            self._agreement("ll_combine", error, values)
            pending = self.low_latency.combine(req, use_logfmt=req.use_logfmt)
        hidden = req.handle.hidden
        row = logfmt.row_bytes(hidden) if req.use_logfmt else hidden * req.x.element_size()
        self._set_ll_combine_minimum(req.handle, row)
        return pending

    @property
    def shrink(self) -> bool:
        """Shrink mode: low-latency calls mask silent peers (:mod:`flexep.algorithms.ll_shrink`)."""
        return self.low_latency.link is not None

    def enable_shrink(self) -> None:
        """Route low-latency exchanges point to point through the store, with a peer mask.

        Local errors are then raised on the calling rank only (no collective checks): a peer
        that does not take part is masked by the others after ``timeout`` seconds.
        """
        self.low_latency.link = ShrinkLink(self.uid, self.transport)

    def shrink_barrier(self) -> None:
        """DeepEP's shrink barrier: every unmasked peer, the silent ones masked."""
        self._begin("ll_clean")
        self.low_latency.link.barrier()

    def prepare_low_latency(self) -> None:
        """Give low-latency exchanges process groups of their own (collective: every rank of the
        group calls it, once), so that their checks can ride in the payload (see
        :meth:`flexep.algorithms.low_latency.LowLatency.use_groups`). Only where the payload is on
        the host: accelerators keep the control round, and the EP group's communicator."""
        if self.host_group is not None:
            return
        ranks = list(range(self.world))
        lanes = {role: [subgroup(self.group, ranks) for _ in range(self.num_channels)]
                 for role in ("frames", "weights")}
        for role, groups in lanes.items():
            self.transport.channels["ll_" + role] = groups[1:]
        self.low_latency.use_groups({role: groups[0] for role, groups in lanes.items()})

    @property
    def _ll_in_band(self) -> bool:
        """Low-latency checks ride in the payload: checks on, the payload on the host, and the
        exchanges on groups of their own (:meth:`prepare_low_latency`)."""
        return self.check_consistency and self.host_group is None and self.low_latency.groups is not None

    def check_ll_handle(self, handle) -> None:
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError("handle must be the handle low_latency_dispatch returned, got "
                            f"{type(handle).__name__}")
        if handle.owner != self.uid:
            raise ValueError("handle was produced by another Buffer/communicator; low-latency combine "
                             "must use the one that dispatched")
        if not handle.received:
            raise ValueError("the dispatch of this handle ran with return_recv_hook=True and its hook "
                             "has not been called yet; call it before combining")

    def _set_ll_minimum(self, topk_idx: torch.Tensor, num_experts: int, row: int) -> None:
        """LL dispatch minimum: one wire row per (token, destination rank) of this rank's
        routing (computed, reading the device, only when someone asks)."""
        topo, rank, world = self.topology, self.rank, self.world
        self.transport.stats.set_minimum(lambda: _per_peer(
            topo, rank, compute_layout(topk_idx.cpu(), num_experts, world).num_tokens_per_rank, row))

    def _set_ll_combine_minimum(self, handle: LowLatencyHandle, row: int) -> None:
        """LL combine minimum: one row back per token each source sent here (from the handle's
        receive layout, read only when someone asks)."""
        topo, rank, world = self.topology, self.rank, self.world
        spare = handle.num_local_experts * handle.recv_slot.size(0)

        def minimum() -> dict:
            per_source = (handle.recv_slot < spare).any(1).view(world, -1).sum(1).cpu()
            return _per_peer(topo, rank, per_source, row)
        self.transport.stats.set_minimum(minimum)

    def barrier(self, op: str = "barrier", error: Optional[BaseException] = None, **values: int) -> None:
        """A control round that every rank must make (raises everywhere on a local ``error``)."""
        self._begin(op)
        self.control.round(op, error=error, check=self.check_consistency, **values)


def _per_peer(topo: Topology, rank: int, rows: torch.Tensor, row_bytes: int) -> dict:
    out = {"local": 0, "intra": 0, "inter": 0}
    for peer, n in enumerate(rows.tolist()):
        out[topo.link_class(rank, peer)] += int(n) * row_bytes
    return out


def _ll_dispatch_values(req: LLDispatchRequest) -> dict:
    mode = int(bool(req.use_fp8)) | int(bool(req.round_scale)) << 1 | int(bool(req.use_ue8m0)) << 2
    return dict(hidden=req.x.size(1), x_dtype=dtype_code(req.x.dtype), num_experts=req.num_experts,
                num_topk=req.topk_idx.size(1), capacity=req.capacity, mode=mode, num_tokens=req.x.size(0))


def _ll_combine_values(req: LLCombineRequest) -> dict:
    h = req.handle
    return dict(hidden=h.hidden, x_dtype=dtype_code(req.x.dtype), num_experts=h.num_experts,
                num_topk=req.topk_weights.size(1), capacity=h.num_max_dispatch_tokens_per_rank,
                mode=int(bool(req.use_logfmt)), num_tokens=h.num_tokens)


def _agree_dispatch(req: DispatchRequest) -> dict:
    return dict(**_agree_rows(req.x, req.scales), num_experts=req.num_experts,
                num_topk=req.topk_idx.size(1) if req.topk_idx is not None else -1)


def _agree_rows(x: torch.Tensor, scales: Optional[torch.Tensor]) -> dict:
    """Header fields of a row format that must be equal on every rank."""
    return dict(hidden=x.size(1), x_dtype=dtype_code(x.dtype),
                num_scales=scales.size(1) if scales is not None else -1,
                scale_dtype=dtype_code(scales.dtype if scales is not None else None))


def _agree_sync_free(req: SyncFreeDispatchRequest) -> dict:
    return dict(**_agree_rows(req.x, req.scales), num_experts=req.num_experts,
                num_topk=req.topk_idx.size(1), has_weights=int(req.topk_weights is not None),
                capacity=req.capacity, num_tokens=req.x.size(0))


def _num_scales(scales: Optional[torch.Tensor]) -> int:
    return 0 if scales is None else scales.size(1)


def _scale_spec(scales: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if scales is None else (scales.size(1), scales.dtype)


def _check_worst_tokens(tp: Transport, header: Header) -> None:
    """Raise on every rank if any rank receives more tokens than its ``num_worst_tokens``."""
    worst = header.field("num_worst_tokens")
    received = header.counts.sum(0).tolist()
    over = [r for r, (w, n) in enumerate(zip(worst, received)) if w > 0 and n > w]
    if over:
        detail = ", ".join(f"rank {r} receives {received[r]} > num_worst_tokens {worst[r]}" for r in over)
        raise CapacityError(f"num_worst_tokens is too small: {detail}; expected num_worst_tokens >= "
                            "the tokens a rank receives (at most num_tokens * num_ranks)",
                            op="dispatch", phase="header", seq=tp.seq, ranks=over)

