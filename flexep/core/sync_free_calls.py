"""Sync-free normal-mode calls of :class:`flexep.core.Communicator` (DeepEP V2's
``do_cpu_sync=False``): static shapes, no host read; the mixin the communicator is built from."""

from __future__ import annotations

from typing import Optional

import torch

from ..algorithms.contract import (
    Combined,
    Dispatched,
    SyncFreeCachedRequest,
    SyncFreeCombineRequest,
    SyncFreeDispatchRequest,
    SyncFreeHandle,
)
from ..algorithms.sync_free import wire_row_bytes_sync_free
from ..comm.control import dtype_code
from . import checks as C
from .ll_calls import per_peer
from .normal_calls import Requested, agree_rows

__all__ = ["SyncFreeCalls"]


class SyncFreeCalls:
    """Dispatch and combine with worst-case sizes and device-resident counts; methods of
    ``Communicator``."""

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
            **agree_rows(req.x, req.scales), has_weights=int(req.topk_weights is not None)))
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
        self.transport.stats.set_minimum(lambda: per_peer(topo, rank, handle.recv_counts.cpu(), row))
        return out


def _agree_sync_free(req: SyncFreeDispatchRequest) -> dict:
    return dict(**agree_rows(req.x, req.scales), num_experts=req.num_experts,
                num_topk=req.topk_idx.size(1), has_weights=int(req.topk_weights is not None),
                capacity=req.capacity, num_tokens=req.x.size(0))


def _num_scales(scales: Optional[torch.Tensor]) -> int:
    return 0 if scales is None else scales.size(1)
