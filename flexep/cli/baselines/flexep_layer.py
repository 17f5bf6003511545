"""flexep driven as its own ``MoELayer`` drives it (``flexep/moe/layer.py``, ``_routed_normal``),
so that it is timed with the same boundaries as the framework dispatchers.

One pass on this rank:

    dispatch  ``autograd.dispatch`` (layout of the routing, then dispatch: one row per (token,
              destination rank) with the top-k ids and weights), then the (row, slot) pairs of
              local experts sorted by expert and gathered: expert-major rows
    expert    the stand-in
    combine   weighting in float32 by the received weights, the K slots of each received row
              summed, rounded once to bf16, ``autograd.combine``

The flexep bench's own "dispatch" and "combine" rows time ``Buffer.dispatch`` and
``Buffer.combine`` alone; the framework dispatchers' dispatch and combine also reorder rows to
experts and weight them, which is what this driver adds.
"""

from __future__ import annotations

from typing import Union

import torch

from ... import autograd
from ...core.communicator import Communicator
from ...deepep.buffer import Buffer
from . import harness

__all__ = ["LABEL", "FlexepLayerDriver"]

LABEL = "flexep as its MoELayer drives it"


class FlexepLayerDriver(harness.Driver):
    """See the module docstring; ``buffer`` is a flexep ``Buffer`` (or ``Communicator``) over the
    group the bench runs on."""

    label = LABEL

    def __init__(self, buffer: Union[Buffer, Communicator], x: torch.Tensor, topk_idx: torch.Tensor,
                 topk_weights: torch.Tensor, experts: int, group=None) -> None:
        super().__init__(x, topk_idx, topk_weights, experts, group)
        self.buffer = buffer

    def dispatch(self) -> tuple:
        k = self.topk_idx.size(1)
        recv_x, recv_idx, recv_w, _, handle = autograd.dispatch(self.buffer, self.x, self.topk_idx,
                                                                self.topk_weights, self.experts)
        # (row, slot) pairs this rank serves, grouped by local expert, (rank, token) order kept
        flat = recv_idx.flatten()
        pos = (flat >= 0).nonzero().flatten()
        pos = pos[torch.sort(flat[pos], stable=True).indices]
        rows, slots = pos // k, pos % k
        counts = torch.bincount(flat[pos], minlength=self.local)
        weights = recv_w[rows, slots]
        return recv_x[rows], counts, weights, (pos, weights, recv_x.size(0), handle)

    def combine(self, expert_out: torch.Tensor, state) -> torch.Tensor:
        pos, weights, m, handle = state
        k, h = self.topk_idx.size(1), self.x.size(1)
        y = expert_out.float() * weights.unsqueeze(1)
        per_slot = y.new_zeros(m * k, h).index_put((pos,), y).view(m, k, h)
        summed = per_slot[:, 0]
        for j in range(1, k):  # slot order 0..K-1, as the layer sums them
            summed = summed + per_slot[:, j]
        return autograd.combine(self.buffer, summed.to(self.x.dtype), handle)
