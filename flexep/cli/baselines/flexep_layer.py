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
from ...moe.slots import local_slots, served_rows, sum_slots_per_row, weighted_rows
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
        recv_x, recv_idx, recv_w, _, handle = autograd.dispatch(self.buffer, self.x, self.topk_idx,
                                                                self.topk_weights, self.experts)
        served = local_slots(recv_idx, self.local)
        rows, weights = served_rows(recv_x, recv_w, served)
        return rows, served.counts, weights, (served, weights, recv_x.size(0), handle)

    def combine(self, expert_out: torch.Tensor, state) -> torch.Tensor:
        served, weights, m, handle = state
        y = weighted_rows(expert_out, weights)
        summed = sum_slots_per_row(y, served, m)
        return autograd.combine(self.buffer, summed.to(self.x.dtype), handle)
