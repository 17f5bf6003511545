"""Low-latency calls of :class:`flexep.core.Communicator` (decode: fixed capacity, static
shapes, never a host read), shrink mode included; the mixin the communicator is built from."""

from __future__ import annotations

import torch

from ..algorithms import logfmt
from ..algorithms.contract import LLCombineRequest, LLDispatchRequest, LowLatencyHandle
from ..algorithms.ll_shrink import ShrinkLink
from ..algorithms.low_latency import WeightsRow, WireRow
from ..comm.control import dtype_code
from ..comm.topology import Topology, subgroup
from ..layout import compute_layout
from . import checks as C
from .normal_calls import Requested

__all__ = ["LowLatencyCalls", "per_peer"]


class LowLatencyCalls:
    """Fixed-capacity dispatch and combine; methods of ``Communicator``."""

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
        self.transport.stats.set_minimum(lambda: per_peer(
            topo, rank, compute_layout(topk_idx.cpu(), num_experts, world).num_tokens_per_rank, row))

    def _set_ll_combine_minimum(self, handle: LowLatencyHandle, row: int) -> None:
        """LL combine minimum: one row back per token each source sent here (from the handle's
        receive layout, read only when someone asks)."""
        topo, rank, world = self.topology, self.rank, self.world
        spare = handle.num_local_experts * handle.recv_slot.size(0)

        def minimum() -> dict:
            per_source = (handle.recv_slot < spare).any(1).view(world, -1).sum(1).cpu()
            return per_peer(topo, rank, per_source, row)
        self.transport.stats.set_minimum(minimum)


def per_peer(topo: Topology, rank: int, rows: torch.Tensor, row_bytes: int) -> dict:
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
