"""The link model: time of one phase from per-rank loads.

For every rank r the phase needs, on each resource, ``bytes / rate``:

* ``nic_send``, ``nic_recv``: network bytes out and in, at the NIC goodput (full duplex);
* ``intra_send``, ``intra_recv``: scale-up bytes out and in, at the intra-node link rate;
* ``copy``: bytes its kernel copies, at ``channels * copy_gbs_per_channel``.

Transfers on different resources overlap (the kernels pipeline them), so rank r needs the
largest of these, plus ``messages[r] * message_us`` for issuing its messages. The slowest rank
bounds the phase; shared resources that belong to no rank (the network's spine links, see
:mod:`flexep.planner.ecmp`) join the maximum as ``shared`` terms. A fixed cost (launch, notify,
one latency per hop) is added once::

    t = fixed_us + max( max_r (messages[r] * message_us + max_k load_k[r] / rate_k),
                        max_j shared_j )

Example: two ranks, NIC 50 GB/s, loads ``nic_send = [1e6, 2e6]`` bytes, no messages, fixed 5
us: rank 1 needs 2e6 / 50e3 = 40 us, so the phase takes 45 us.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

__all__ = ["PhaseTime", "phase_time", "us"]


def us(nbytes: float, gbs: float) -> float:
    """Microseconds to move ``nbytes`` at ``gbs`` GB/s (1 GB/s = 1e3 bytes per us)."""
    return nbytes / (gbs * 1e3)


@dataclass(frozen=True)
class PhaseTime:
    """Predicted time of one phase.

    Attributes:
        total_us: the prediction.
        fixed_us: launch and latency part.
        terms_us: per resource, the slowest rank's time on it (and each shared term).
        bottleneck: the resource that sets the time (``"messages"`` if issue cost dominates).
        rank: the slowest rank (-1 when a shared resource is the bottleneck).
    """

    total_us: float
    fixed_us: float
    terms_us: dict = field(default_factory=dict)
    bottleneck: str = ""
    rank: int = -1


def phase_time(loads: Mapping[str, torch.Tensor], rates_gbs: Mapping[str, float], fixed_us: float,
               messages: Optional[torch.Tensor] = None, message_us: float = 0.0,
               shared_us: Optional[Mapping[str, float]] = None) -> PhaseTime:
    """Apply the link model (module docstring) to ``loads[k]: [W]`` bytes per rank."""
    missing = set(loads) - set(rates_gbs)
    if missing:
        raise ValueError(f"rates_gbs has no rate for load(s) {sorted(missing)}")
    names = list(loads)
    if not names:
        raise ValueError("loads must name at least one resource")
    per = torch.stack([loads[k].to(torch.float64) / (rates_gbs[k] * 1e3) for k in names])  # [R, W]
    busiest, which = per.max(0)  # per rank: its slowest resource
    issue = torch.zeros_like(busiest) if messages is None else messages.to(torch.float64) * message_us
    rank_t = issue + busiest
    rank = int(rank_t.argmax())
    terms = {k: float(per[i].max()) for i, k in enumerate(names)}
    if message_us:
        terms["messages"] = float(issue.max())
    best, bottleneck = float(rank_t[rank]), names[int(which[rank])]
    if issue[rank] > busiest[rank]:
        bottleneck = "messages"
    for k, v in (shared_us or {}).items():
        terms[k] = float(v)
        if v > best:
            best, bottleneck, rank = float(v), k, -1
    return PhaseTime(total_us=fixed_us + best, fixed_us=fixed_us, terms_us=terms,
                     bottleneck=bottleneck, rank=rank)
