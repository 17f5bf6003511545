"""Opt-in conservation checks (``Buffer(verify=True)`` or ``FLEXEP_VERIFY=1``).

After an exchange every rank publishes, per peer, how many rows it sent and a position-weighted
checksum of their bytes, and the same for what it received. One all-gather later every rank
holds the full ``[W, W]`` sent and received tables and compares ``sent[s][d]`` with
``received[d][s]``: any difference raises :class:`~flexep.errors.ConservationError` on every
rank, naming the (source, destination) pairs. This catches lost, duplicated, reordered,
truncated or altered rows, whatever the transport did.

Checksums are computed on the payload's device and exchanged through the same group; the
comparison reads the gathered table on the host once per exchange (verify mode is a debugging
aid and not free: one extra round and one host read per exchange).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .._dtypes import dense, wire_view
from ..errors import ConservationError

__all__ = ["block_checksums", "check_exchange"]


def _row_sums(t: torch.Tensor) -> torch.Tensor:
    """``[R, ...] -> [R] int64``: sum of each row's bytes, read as int32 words when aligned."""
    flat = wire_view(dense(t)).reshape(t.size(0), math.prod(t.shape[1:])).view(torch.uint8)
    if flat.size(1) % 4 == 0:
        return flat.view(torch.int32).sum(1, dtype=torch.int64)
    return flat.sum(1, dtype=torch.int64)


def block_checksums(tensors: Sequence[torch.Tensor], counts: Sequence[int]) -> torch.Tensor:
    """``[len(counts), 2] int64``: rows and a checksum per consecutive block of rows.

    Rows are weighted by their position inside the block, so reordering is detected too.
    """
    device = tensors[0].device
    sums = sum(_row_sums(t) * 1_000_003 ** i for i, t in enumerate(tensors))
    # Position of each row inside its block (1-based), built from the host counts.
    block = torch.repeat_interleave(torch.arange(len(counts), device=device),
                                    torch.tensor(list(counts), device=device),
                                    output_size=int(sum(counts)))
    starts = torch.tensor([0, *counts], device=device).cumsum(0)[:-1]
    position = torch.arange(int(sum(counts)), device=device) - starts[block] + 1
    weighted = torch.zeros(len(counts), dtype=torch.int64, device=device)
    weighted.index_add_(0, block, sums * position)
    rows = torch.tensor(list(counts), dtype=torch.int64, device=device)
    return torch.stack([rows, weighted], 1)


def check_exchange(tp, phase: str, sent: torch.Tensor, received: torch.Tensor,
                   members: Sequence[int] | None = None, group=None) -> None:
    """Compare ``sent [G, 2]`` (per destination) with ``received [G, 2]`` (per source) globally."""
    members = list(members) if members is not None else list(range(tp.world))
    table = tp.all_gather(f"verify_{phase}", torch.cat([sent.flatten(), received.flatten()]),
                          group=group, members=members)
    table = table.cpu()  # the one host read of the check
    g = len(members)
    sent_all = table[:, : 2 * g].view(g, g, 2)  # [src, dst]
    recv_all = table[:, 2 * g:].view(g, g, 2)  # [dst, src]
    bad = []
    for s in range(g):
        for d in range(g):
            if not torch.equal(sent_all[s, d], recv_all[d, s]):
                bad.append((members[s], members[d], sent_all[s, d].tolist(), recv_all[d, s].tolist()))
    if bad:
        pairs = "; ".join(f"{s}->{d}: sent rows/checksum {a}, received {b}" for s, d, a, b in bad[:8])
        raise ConservationError(f"verify: {len(bad)} (source, destination) pair(s) do not match: {pairs}",
                                op=tp.op, phase=phase, seq=tp.seq,
                                ranks=sorted({p for s, d, *_ in bad for p in (s, d)}))
