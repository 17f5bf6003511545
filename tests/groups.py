"""Process-group helpers shared by the multi-rank tests."""

from __future__ import annotations

import torch.distributed as dist


def ep_subgroups(rank: int, world: int, sizes=(1, 2, 4)) -> dict:
    """This rank's EP group of each size, the world cut into contiguous blocks.

    ``new_group`` is collective over the whole world, so every rank creates every group and keeps
    its own. Example (world 4, rank 2): ``{1: [2], 2: [2, 3], 4: [0, 1, 2, 3]}``.
    """
    mine = {}
    for size in sizes:
        for start in range(0, world, size):
            group = dist.new_group(list(range(start, start + size)))
            if start <= rank < start + size:
                mine[size] = group
    return mine
