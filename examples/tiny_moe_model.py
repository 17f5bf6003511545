"""The tiny model and toy task shared by ``train_tiny_moe.py`` and ``serve_decode.py``.

One pre-norm DeepSeek-V3 MoE block and a linear head, learning a fixed random "teacher" function
of 64-dim token vectors. Small enough to train on a laptop's CPU ranks in seconds.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from flexep import Buffer
from flexep.eplb import Placement
from flexep.moe import MoEConfig, MoELayer

CONFIG = MoEConfig(hidden=64, intermediate=96, num_experts=16, topk=4, n_group=4, topk_group=2,
                   routed_scaling_factor=2.5, num_shared_experts=1, bias_update_speed=1e-3)


class TinyMoEModel(torch.nn.Module):
    """``x: [T, 64] -> [T, 64]``: ``head(x + moe(rms_norm(x)))``; collective over the buffer's group."""

    def __init__(self, buffer: Buffer, placement: Optional[Placement] = None, seed: int = 0,
                 num_max_dispatch_tokens_per_rank: int = 128, slotwise_combine: bool = False) -> None:
        super().__init__()
        self.moe = MoELayer(CONFIG, buffer, placement=placement, seed=seed,
                            num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank,
                            slotwise_combine=slotwise_combine)
        gen = torch.Generator().manual_seed(seed)
        self.head = torch.nn.Parameter(torch.randn(CONFIG.hidden, CONFIG.hidden, generator=gen)
                                       * CONFIG.hidden ** -0.5)

    def forward(self, x: torch.Tensor, low_latency: Optional[bool] = None) -> torch.Tensor:
        h = x + self.moe(F.rms_norm(x, (x.size(-1),)), low_latency=low_latency)
        return h @ self.head


def teacher_batch(step: int, rank: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[tokens, 64]`` drawn per (step, rank) and the teacher's targets for them."""
    gen = torch.Generator().manual_seed(12345)
    a = torch.randn(CONFIG.hidden, 4 * CONFIG.hidden, generator=gen) / CONFIG.hidden ** 0.5
    b = torch.randn(4 * CONFIG.hidden, CONFIG.hidden, generator=gen) / (4 * CONFIG.hidden) ** 0.5
    x = torch.randn(tokens, CONFIG.hidden, generator=torch.Generator().manual_seed(step * 1009 + rank))
    return x, torch.sin(2 * x @ a) @ b
