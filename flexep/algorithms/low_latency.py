"""Low-latency (LL) dispatch and combine: fixed capacity, static shapes, no host sync.

DeepEP V1's low-latency kernels (decoding: few tokens per rank, lowest latency, CUDA graphs,
overlap with compute) written against :class:`~flexep.comm.transport.Transport`. Every tensor
shape here depends only on the call's arguments, never on the routing, and nothing is read back
to the host, so on NCCL the whole path can be captured in a CUDA graph.

Shape legend: :mod:`flexep.algorithms.contract`; R = W * Q rows (Q per peer), S' scale columns,
B bytes of one wire row.

Dispatch: each token at most once per destination rank, Q rows per (source, destination)
-----------------------------------------------------------------------------------------
1. :func:`~flexep.algorithms.ll_wire.send_index` lists, for every rank d, the tokens that chose
   an expert on d in rows ``[d*Q, d*Q + n_d)`` of a ``[R]`` index; the rest point at a padding
   row. ``T <= Q`` means a block never overflows, so nothing is ever dropped.
2. :func:`~flexep.algorithms.ll_wire.pack_dispatch` builds each token's wire row once (FP8 cast
   written straight into it) and gathers the rows per destination.
3. one ``all_to_all`` with even splits: Q rows to and from every peer.
4. :func:`~flexep.algorithms.ll_wire.expand_dispatch` gives every (received row, k) whose expert
   is local a slot: each source's tokens form one contiguous block per expert, blocks packed
   from slot 0 in rank order (one valid "arrival order" in DeepEP's terms).

Combine: weights to the owners, one partial sum back per (token, rank)
----------------------------------------------------------------------
1. the source sends its ``topk_weights`` along the dispatch's send index (a small round);
2. each owner sums, per received row, ``w[k] * x[expert_k, slot_k]`` over the k whose expert is
   local, in float32, rounded once (:mod:`flexep.algorithms.ll_reduce`); with ``use_logfmt``
   the partial rows are then LogFMT-encoded (:mod:`flexep.algorithms.logfmt`);
3. one ``all_to_all`` returns the Q rows per pair to their sources;
4. the source adds the partial rows of each token in float32 and rounds once.

Bytes per call (padding rows included: they are part of the static shape): each rank sends Q
rows of B bytes to every peer, FP8 ``B = align16(H + 4S + 4 + 4K)`` (7440 for H = 7168, K = 8),
and Q rows of 2H bytes back (or ``H/32 + 1.25 H`` with LogFMT). DeepEP writes only the routed
messages into a worst-case-sized buffer; a collective with static splits moves Q rows per pair
on every call, the price of having no host sync (about 10% over the routing's minimum for
DeepSeek-V3's routing at 8-128 tokens per rank on 4 ranks).

Buffers: every buffer, returned or internal, comes from the algorithm's
:class:`~flexep.comm.pool.BufferPool`: reused once nobody holds it, so a decode loop alternates
between two sets as DeepEP does, and a result is never overwritten while the caller holds it.

Receive hooks: :meth:`LowLatency.dispatch` / :meth:`LowLatency.combine` launch the exchange and
return a pending object whose ``finish()`` waits and fills the outputs in place. Combine's send
half waits for the weights round before it launches the payload.

Call headers: when the communicator checks calls in-band (:mod:`flexep.core.ll_agreement`), a
32-byte header rides in every dispatch row and weights row, and ``verify`` checks the received
headers before any data is used.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..comm.pool import BufferPool
from ..comm.transport import Transport
from . import logfmt
from .contract import LLCombineRequest, LLDispatchRequest, LowLatencyHandle
from .ll_reduce import reduce_owner, sum_partials
from .ll_shrink import Posted, ShrinkLink
from .ll_wire import (
    HEADER_BYTES,
    DispatchOutputs,
    WireRow,
    aligned,
    as_words,
    expand_dispatch,
    pack_dispatch,
    rdma_size_hint,
    send_index,
)

__all__ = ["LowLatency", "LowLatencyHandle", "WireRow", "WeightsRow", "rdma_size_hint", "send_index",
           "as_words", "aligned", "pack_dispatch", "expand_dispatch", "reduce_owner", "sum_partials",
           "DispatchOutputs", "PendingDispatch", "PendingCombine"]

Verify = Callable[[torch.Tensor], None]


class WeightsRow:
    """Byte layout of one combine weights row: K float32 weights, then the optional header.

    Example: K = 8 -> 32 bytes; with the header 64 (header at offset 32).
    """

    def __init__(self, num_topk: int, header: bool) -> None:
        self.num_topk, self.header = num_topk, header
        self.header_offset = -(-4 * num_topk // 8) * 8
        self.nbytes = self.header_offset + HEADER_BYTES if header else 4 * num_topk

    def header_words(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[:, self.header_offset:self.header_offset + HEADER_BYTES].view(torch.int64)


def block_headers(recv: torch.Tensor, header_offset: int, num_ranks: int) -> torch.Tensor:
    """``[W, 4] int64``: the header of the first row of each peer's block of ``recv: [R, B]``."""
    first = recv.view(num_ranks, -1, recv.size(1))[:, 0]
    return first[:, header_offset:header_offset + HEADER_BYTES].view(torch.int64)


class PendingDispatch:
    """Send half of an LL dispatch: outputs exist (unfilled) until :meth:`finish` runs."""

    def __init__(self, algo: LowLatency, exchange, recv: torch.Tensor, out: DispatchOutputs,
                 row: WireRow, on_done: Optional[Callable[[DispatchOutputs], None]] = None,
                 verify: Optional[Verify] = None) -> None:
        self._algo, self._exchange, self._recv, self.out, self._row = algo, exchange, recv, out, row
        self._tp = algo.tp
        self._on_done, self._verify = on_done, verify
        self.done = False

    def finish(self) -> None:
        """Wait for the exchange, check the headers, fill the outputs (idempotent)."""
        if self.done:
            return
        self._algo.wait(self._exchange)
        recv, self._recv = self._recv, None
        if self._verify is not None:
            self._verify(block_headers(recv, self._row.header_offset, self._tp.world))
        expand_dispatch(recv, self.out, self._row, self._tp.rank, self._tp.world)
        self.done = True
        if self._on_done is not None:
            self._on_done(self.out)


class PendingCombine:
    """Send half of an LL combine: ``out`` is filled when :meth:`finish` runs."""

    def __init__(self, algo: LowLatency, exchange, back: torch.Tensor, index: torch.Tensor,
                 out: torch.Tensor, hidden: int, use_logfmt: bool) -> None:
        self._algo, self._exchange, self._back, self._index, self.out = algo, exchange, back, index, out
        self._pool, self._hidden, self._logfmt = algo.pool, hidden, use_logfmt
        self.done = False

    def finish(self) -> None:
        """Wait for the partial sums and reduce them into ``out`` (idempotent)."""
        if self.done:
            return
        self._algo.wait(self._exchange)
        back, self._back = self._back, None
        if self._logfmt:
            back = logfmt.decode(back, self._hidden)
        sum_partials(back, self._index, self.out.size(0), self._pool.get, out=self.out)
        self.done = True


class LowLatency:
    """Fixed-capacity dispatch/combine over one EP group (see the module docstring)."""

    name = "low_latency"

    def __init__(self, tp: Transport, owner: int) -> None:
        self.tp, self.owner = tp, owner
        self.pool = BufferPool()
        self.link: Optional[ShrinkLink] = None  # shrink mode (see flexep.algorithms.ll_shrink)
        self.groups: Optional[dict] = None  # phase -> own process group (see :meth:`use_groups`)

    def use_groups(self, groups: dict) -> None:
        """Run the exchanges on groups of their own: ``{"frames": g, "weights": g}`` (the
        transport's channel lanes for the roles of the same names extend them).

        Payload frames that carry their own checks (:mod:`flexep.core.ll_agreement`) are posted
        without a preceding control round, so a rank making another call must never meet them
        on a group where its exchange has another size (Gloo aborts on a size mismatch): on
        groups of their own, a mismatched call waits and ends at the deadline instead.
        """
        self.groups = groups

    def _route(self, phase: str) -> dict:
        if self.groups is None:
            return {}
        role = "weights" if phase == "ll_weights" else "frames"
        return {"group": self.groups[role], "role": "ll_" + role}

    def start(self, phase: str, send: torch.Tensor, recv: torch.Tensor, capacity: int, empty: int):
        """Post an exchange of ``capacity`` rows per peer; in shrink mode a silent peer's block
        reads as bytes ``empty`` (0xFF: padding rows, ids -1; 0: zeros)."""
        if self.link is not None:
            return self.link.start(phase, send, recv, ShrinkLink.fill(empty))
        even = [capacity] * self.tp.world
        return self.tp.start(phase, [send], [recv], even, even, **self._route(phase))

    def wait(self, exchange) -> None:
        if isinstance(exchange, Posted):
            self.link.wait(exchange)
        else:
            self.tp.wait(exchange)

    def dispatch(self, req: LLDispatchRequest, header: Optional[torch.Tensor] = None,
                 verify: Optional[Verify] = None) -> tuple[PendingDispatch, LowLatencyHandle]:
        """Pack, launch the exchange, allocate the outputs; the handle fills in on ``finish``.

        ``header: [4] int64`` rides in every row; ``verify`` gets the ``[W, 4]`` received
        headers before the outputs are filled.
        """
        tp, alloc = self.tp, self.pool.get
        world, x, topk_idx, capacity = tp.world, req.x, req.topk_idx, req.capacity
        num_local = req.num_experts // world
        row = WireRow.of(x.size(1), topk_idx.size(1), x.dtype, req.use_fp8, req.use_ue8m0, header is not None)
        index = send_index(topk_idx, req.num_experts, world, capacity)
        send = pack_dispatch(x, topk_idx, index, row, req.use_fp8, req.round_scale, req.use_ue8m0,
                             header=header, alloc=alloc)
        recv = alloc("ll_recv", tuple(send.shape), torch.uint8, x.device)
        tp.fault_point("before_payload")
        exchange = self.start("ll_dispatch", send, recv, capacity, 0xFF)
        out = DispatchOutputs.allocate(num_local, world, capacity, topk_idx.size(1), row, x.size(1),
                                       x.dtype, req.use_fp8, req.use_ue8m0, x.device, alloc)
        stats = req.cumulative_local_expert_recv_stats
        on_done = None if stats is None else (lambda o: stats.add_(o.recv_count.to(stats.dtype)))
        pending = PendingDispatch(self, exchange, recv, out, row, on_done, verify)
        handle = LowLatencyHandle(
            recv_src_info=out.recv_src_info(), recv_layout_range=out.layout_range,
            num_max_dispatch_tokens_per_rank=capacity, hidden=x.size(1), num_experts=req.num_experts,
            send_index=index, recv_slot=out.recv_slot, topk_idx=topk_idx, num_ranks=world,
            owner=self.owner, pending=pending)
        return pending, handle

    def combine(self, req: LLCombineRequest, header: Optional[torch.Tensor] = None,
                verify: Optional[Verify] = None, use_logfmt: bool = False) -> PendingCombine:
        """Weights round (checked by ``verify``), owner reduction, launch of the return exchange."""
        tp, handle, alloc = self.tp, req.handle, self.pool.get
        capacity = handle.num_max_dispatch_tokens_per_rank
        w = req.topk_weights
        wrow = WeightsRow(w.size(1), header is not None)
        tokens = alloc("ll_wtokens", (w.size(0) + 1, wrow.nbytes), torch.uint8, w.device)
        tokens[:-1, :4 * wrow.num_topk].view(torch.float32).copy_(w)
        tokens[-1, :4 * wrow.num_topk] = 0
        if header is not None:
            wrow.header_words(tokens).copy_(header.expand(tokens.size(0), -1))
        index = handle.send_index
        w_send = alloc("ll_wsend", (index.size(0), wrow.nbytes), torch.uint8, w.device)
        torch.index_select(as_words(tokens), 0, index, out=as_words(w_send))
        w_recv = alloc("ll_wrecv", tuple(w_send.shape), torch.uint8, w.device)
        tp.fault_point("before_weights")
        self.wait(self.start("ll_weights", w_send, w_recv, capacity, 0))
        if verify is not None:
            verify(block_headers(w_recv, wrow.header_offset, tp.world))
        weights = w_recv[:, :4 * wrow.num_topk].view(torch.float32)
        partial = reduce_owner(req.x, handle.recv_slot, weights, alloc)
        if use_logfmt:
            partial = logfmt.encode(partial)
        back = alloc("ll_back", tuple(partial.shape), partial.dtype, partial.device)
        tp.fault_point("before_payload")
        exchange = self.start("ll_combine", partial, back, capacity, 0)
        return PendingCombine(self, exchange, back, index, req.out, handle.hidden, use_logfmt)

    def probe(self, phase: str, rows: int, row_bytes: int, header_offset: int, header: torch.Tensor,
              device: torch.device) -> torch.Tensor:
        """Exchange a frame of the agreed size that carries only ``header``; ``[W, 4]`` back.

        Used when this rank cannot fill the frame the peers expect (its call differs from the
        agreed one, or its inputs are invalid): sizes still match, so the peers' exchange
        completes and everyone reads everyone's header.
        """
        tp, alloc = self.tp, self.pool.get
        send = alloc("ll_probe_send", (tp.world * rows, row_bytes), torch.uint8, device)
        send[:, header_offset:header_offset + HEADER_BYTES].view(torch.int64).copy_(
            header.expand(send.size(0), -1))
        recv = alloc("ll_probe_recv", tuple(send.shape), torch.uint8, device)
        even = [rows] * tp.world
        tp.all_to_all(phase, [send], [recv], even, even, **self._route(phase))
        return block_headers(recv, header_offset, tp.world)
