"""Normal-mode calls of :class:`flexep.core.Communicator` (layout, dispatch, cached dispatch,
combine): the mixin the communicator is built from; see :mod:`flexep.core.communicator` for the
call sequence they share."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ..algorithms.contract import (
    CachedDispatchRequest,
    Combined,
    CombineRequest,
    Dispatched,
    DispatchRequest,
    NormalHandle,
    Sends,
)
from ..algorithms.flat import Flat, _row_bytes
from ..algorithms.packing import pack_rows, row_blocks
from ..comm.accounting import flat_minimum, hierarchical_minimum, wire_row_bytes
from ..comm.control import Header, dtype_code
from ..comm.transport import Transport
from ..errors import CapacityError
from ..layout import DispatchLayout, aligned_expert_counts, compute_layout
from . import checks as C

__all__ = ["NormalCalls", "Requested", "agree_rows"]

# A request, or a callable that builds it (errors raised while building are reported on every rank).
Requested = Union[object, Callable[[], object]]


class NormalCalls:
    """High-throughput dispatch and combine (training, prefill); methods of ``Communicator``."""

    def layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        """Counts and masks for dispatching ``topk_idx: [T, K] int64`` (local, no communication)."""
        self.ensure_alive()
        C.check_num_experts(num_experts, self.world)
        C.check_topk_idx(topk_idx, None, num_experts, values=False)
        checked = self._validate_now(topk_idx)
        idx64 = C.check_topk_idx(topk_idx, None, num_experts, values=checked)
        per = self.topology.ranks_per_node if self.topology.is_multi_node else None
        lay = compute_layout(idx64, num_experts, self.world, per)
        # dispatch recognises these tensors and skips the checks they pass by construction
        self._layout_stamp = C.LayoutStamp.of(idx64, lay, num_experts, checked)
        return lay

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
                flags = C.dispatch_value_flags(req, self._layout_stamp)
        staged: list = []
        early = req is not None and req.device.type == "cpu"
        ride = offer = packed = meanwhile = None
        if early:  # counts are on the host already: build the send rows during the round
            sends = Sends(send_counts.tolist(), extra.tolist() if extra is not None else [])
            if self._rides(req.x):
                offer = max((c for d, c in enumerate(sends.counts) if d != rank), default=0) * \
                    _dispatch_row_bytes(req)
            if offer is not None and offer <= self.control.ride_bytes:  # small: rows ride in the round
                staged.append(algo.stage(req, sends))
                packed = algo.ride_rows(staged[0])
                ride = row_blocks(packed, sends.counts)
            else:
                def meanwhile() -> None:
                    staged.append(algo.stage(req, sends))
        header = self.control.round(
            "dispatch", device=req.device if req is not None else None, error=error,
            check=self.check_consistency, send_counts=send_counts, extra=extra, per_dest=per_dest,
            bad_values=flags,
            explain=lambda: C.explain_dispatch_values(req), meanwhile=meanwhile, ride=ride, offer=offer,
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
        out = algo.dispatch(req, staged[0], header, expert_counts, **({} if packed is None else
                                                                      dict(packed=packed)))
        row = _dispatch_row_bytes(req)
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
        self._agreement("cached_dispatch", error, lambda: agree_rows(req.x, req.scales))
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
        ride = offer = packed = None
        if req is not None and req.slot_order is None and self._rides(req.x):
            counts = req.handle.route.recv_counts
            sends = self.normal.combine_sends(req)
            offer = max((c for d, c in enumerate(counts) if d != self.rank), default=0) * _row_bytes(sends)
            if offer <= self.control.ride_bytes:  # small: the rows ride in the agreement round
                packed = pack_rows(sends)
                ride = row_blocks(packed, counts)
        header = self._agreement("combine", error, lambda: dict(
            hidden=req.x.size(1), x_dtype=dtype_code(req.x.dtype),
            has_weights=int(req.topk_weights is not None), mode=int(req.slot_order is not None)),
            ride=ride, offer=offer)
        if header is not None and header.ride is not None:
            out = self.normal.combine(req, ride=header.ride, packed=packed)
        else:
            out = (self.normal if req.slot_order is None else self.slot_combine).combine(req)
        k = req.topk_weights.size(1) if req.topk_weights is not None else 0
        self._set_minimum(req.handle, wire_row_bytes(req.x.size(1), req.x.dtype, topk_weights=k),
                          reverse=True)
        return out

    def _rides(self, x: torch.Tensor) -> bool:
        """Whether this call's payload may ride in its control round: host tensors on the flat
        algorithm, exchanges not verified (verification checks exchanges, not rounds)."""
        return isinstance(self.normal, Flat) and x.device.type == "cpu" and not self.transport.verify

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


def _agree_dispatch(req: DispatchRequest) -> dict:
    return dict(**agree_rows(req.x, req.scales), num_experts=req.num_experts,
                num_topk=req.topk_idx.size(1) if req.topk_idx is not None else -1)


def agree_rows(x: torch.Tensor, scales: Optional[torch.Tensor]) -> dict:
    """Header fields of a row format that must be equal on every rank."""
    return dict(hidden=x.size(1), x_dtype=dtype_code(x.dtype),
                num_scales=scales.size(1) if scales is not None else -1,
                scale_dtype=dtype_code(scales.dtype if scales is not None else None))


def _dispatch_row_bytes(req: DispatchRequest) -> int:
    """Bytes of one dispatched row with its metadata (what flat dispatch moves per row)."""
    topk = req.topk_idx.size(1) if req.topk_idx is not None else 0
    return wire_row_bytes(req.x.size(1), req.x.dtype, scales=_scale_spec(req.scales), topk_ids=topk,
                          topk_weights=topk, src_index=True)


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

