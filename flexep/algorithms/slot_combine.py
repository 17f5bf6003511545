"""Combine in DeepEP V2's slot order for handles of the counted (CPU-sync) normal mode.

Flat and hierarchical dispatch both deliver rows grouped by source rank in rank order, source
token order inside, so one flat exchange returns every received row to its source whatever
algorithm dispatched: rank d sends its ``counts[s, d]`` rows back to each s, and s gets, per
destination d, its tokens sent to d in token order. The source then reduces in slot order
(:mod:`flexep.algorithms.slot_reduce`), which needs each rank's partial apart: the
hierarchical combine's per-node pre-reduction (rank order) is not used here, so on several
nodes this combine sends the flat algorithm's bytes (reported against the routing's minimum).

Sizes come from the handle's count matrix (host), positions from ``is_token_in_rank``: no host
read.
"""

from __future__ import annotations

from ..comm.transport import Transport
from .contract import Combined, CombineRequest
from .slot_reduce import flat_rowmap, owners, pick_weights, slot_reduce, slot_rows

__all__ = ["SlotCombine"]


class SlotCombine:
    """Return rows along a normal handle's routing and reduce them per ``req.slot_order``."""

    name = "slot_combine"

    def __init__(self, tp: Transport, owner: int) -> None:
        self.tp, self.owner = tp, owner

    def combine(self, req: CombineRequest) -> Combined:
        tp, h, order = self.tp, req.handle, req.slot_order
        send_counts, recv_counts = h.send_counts, h.recv_counts
        total, num_recv = sum(send_counts), h.num_recv_tokens
        sends, backs = [], []
        for part in (req.x, req.topk_weights):
            if part is None:
                continue
            back = part.new_empty(total + 1, part.size(1))
            back[-1].zero_()
            sends.append(part[:num_recv])
            backs.append(back)
        tp.fault_point("before_payload")
        tp.all_to_all("payload", sends, [b[:-1] for b in backs], recv_counts, send_counts)
        rowmap = flat_rowmap(h.is_token_in_rank, send_counts, total)
        owner = owners(order.topk_idx, order.num_experts // tp.world)
        rows = slot_rows(rowmap, owner, total)
        out = slot_reduce(backs[0], rows, owner, order, tp.world, req.bias)
        weights = pick_weights(backs[1], rows, owner) if req.topk_weights is not None else None
        return Combined(out, weights)
