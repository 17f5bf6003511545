"""Routings to plan with: which experts each rank's tokens choose.

A :class:`Routing` describes a distribution of ``topk_idx``; :meth:`Routing.sample` draws one
``[T, K] int64`` routing per rank of an EP group. Kinds:

* ``uniform``: each token picks K distinct experts uniformly at random (DeepEP's intranode and
  low-latency tests: top-k of ``|randn| + 1`` scores).
* ``zipf``: K distinct experts drawn without replacement with weights ``1 / rank^s`` (``s`` =
  ``zipf_s``) over a seeded random expert order: hot experts, cold experts.
* ``group_limited``: DeepSeek-V3 node-limited routing exactly as DeepEP's internode test does
  it: scores ``|randn| + 1``, per node the maximum score, keep the top ``groups`` nodes
  (default ``min(num_nodes, 4)``), zero the others, then top-K experts.
* ``recorded``: tokens of a recorded ``topk_idx`` (``[T, K]`` or ``[W, T, K]``); used as they
  are when one routing per rank is given, otherwise resampled.

Sampling cost is bounded: at most ``max_distinct_tokens`` tokens are drawn (exactly from the
distribution); when the group needs more, ranks reuse earlier ranks' routings cyclically. Every
rank draws from the same distribution, so only the rank-to-rank spread is overstated a little
(by the square root of the reuse factor: at EP256 with 4096 tokens every 32nd rank shares a
routing, and the busiest rank's load comes out about 2-3% high).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Routing", "ROUTING_KINDS"]

ROUTING_KINDS = ("uniform", "zipf", "group_limited", "recorded")


@dataclass(frozen=True)
class Routing:
    """A routing distribution. See the module docstring for the kinds.

    Attributes:
        kind: one of :data:`ROUTING_KINDS`.
        zipf_s: Zipf exponent for ``zipf`` (0 = uniform).
        groups: nodes a token may reach for ``group_limited`` (None: ``min(num_nodes, 4)``).
        masked_slots: slots set to ``-1`` at random per rank (DeepEP's low-latency test masks 10).
        recorded: ``[T, K]`` or ``[W, T, K]`` int64 for ``recorded``.
    """

    kind: str = "uniform"
    zipf_s: float = 1.0
    groups: Optional[int] = None
    masked_slots: int = 0
    recorded: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.kind not in ROUTING_KINDS:
            raise ValueError(f"Routing kind must be one of {ROUTING_KINDS}, got {self.kind!r}")
        if self.kind == "recorded":
            if not isinstance(self.recorded, torch.Tensor) or self.recorded.dim() not in (2, 3):
                raise ValueError("Routing(kind='recorded') needs recorded=topk_idx, a [T, K] or "
                                 "[W, T, K] int64 tensor")
        if self.zipf_s < 0:
            raise ValueError(f"zipf_s must be >= 0, got {self.zipf_s}")
        if self.groups is not None and self.groups < 1:
            raise ValueError(f"groups must be >= 1 or None, got {self.groups}")
        if self.masked_slots < 0:
            raise ValueError(f"masked_slots must be >= 0, got {self.masked_slots}")

    def describe(self) -> str:
        if self.kind == "zipf":
            return f"zipf(s={self.zipf_s:g})"
        if self.kind == "group_limited":
            return f"group_limited(groups={self.groups or 'min(N,4)'})"
        if self.kind == "recorded":
            return f"recorded{tuple(self.recorded.shape)}"
        return self.kind

    # ---- sampling ----------------------------------------------------------------------------
    def sample(self, num_ranks: int, ranks_per_node: int, num_tokens: int, num_topk: int,
               num_experts: int, seed: int = 0,
               max_distinct_tokens: int = 1 << 17) -> list[torch.Tensor]:
        """One ``[T, K] int64`` routing per rank (``num_ranks`` of them), reproducible by seed."""
        if num_experts % num_ranks:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the EP size "
                             f"({num_ranks})")
        if num_topk > num_experts:
            raise ValueError(f"num_topk ({num_topk}) must be <= num_experts ({num_experts})")
        gen = torch.Generator().manual_seed(seed)
        distinct = max(1, min(num_ranks, max_distinct_tokens // max(1, num_tokens)))
        if self.kind == "recorded":
            rec = self.recorded.to(torch.int64)
            if rec.numel() and int(rec.max()) >= num_experts:
                raise ValueError(f"recorded topk_idx holds expert {int(rec.max())}, but "
                                 f"num_experts is {num_experts}")
            if rec.dim() == 3 and rec.size(0) == num_ranks:
                return self._mask([r.clone() for r in rec], gen)
            pool = rec.reshape(-1, rec.size(-1))
            # Resample the recorded tokens (with replacement) into every rank's routing.
            drawn = [pool[torch.randint(pool.size(0), (num_tokens,), generator=gen)]
                     for _ in range(distinct)]
        else:
            pool = self._draw(distinct * num_tokens, num_topk, num_experts,
                              num_ranks // ranks_per_node, gen)
            drawn = list(pool.view(distinct, num_tokens, num_topk))
        return self._mask([drawn[r % distinct] for r in range(num_ranks)], gen)

    def _mask(self, routings: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
        if not self.masked_slots:
            return routings
        out, seen = [], {}
        for r in routings:
            if id(r) not in seen:  # keep reuse visible to routing_flows' per-tensor memo
                m = r.clone()
                flat = m.view(-1)
                if flat.numel():
                    flat[torch.randint(flat.numel(), (self.masked_slots,), generator=gen)] = -1
                seen[id(r)] = m
            out.append(seen[id(r)])
        return out

    def _draw(self, n: int, k: int, num_experts: int, num_nodes: int,
              gen: torch.Generator) -> torch.Tensor:
        """``[n, k]`` tokens drawn exactly from the distribution, in chunks to bound memory."""
        if self.kind == "uniform" or (self.kind == "group_limited" and num_nodes == 1):
            return _distinct_uniform(n, k, num_experts, gen)
        chunks, step = [], max(1, (1 << 22) // num_experts)
        if self.kind == "zipf":
            order = torch.randperm(num_experts, generator=gen)
            logw = torch.empty(num_experts)
            logw[order] = -self.zipf_s * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float32))
        groups = min(self.groups or min(num_nodes, 4), num_nodes)
        for lo in range(0, n, step):
            m = min(step, n - lo)
            if self.kind == "zipf":
                # Gumbel top-k: sampling k without replacement with probabilities ~ exp(logw).
                u = torch.rand(m, num_experts, generator=gen).clamp_min(1e-20)
                chunks.append(torch.topk(logw - torch.log(-torch.log(u)), k, dim=1).indices)
            elif num_nodes + groups * (num_experts // num_nodes) < num_experts // 2:
                chunks.append(_group_limited(m, k, num_experts, num_nodes, groups, gen))
            else:  # few nodes: drawing every score is as cheap
                chunks.append(group_limited_reference(m, k, num_experts, num_nodes, groups, gen))
        return torch.cat(chunks).to(torch.int64)


def _distinct_uniform(n: int, k: int, num_experts: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, k]`` uniformly random k-subsets of the experts (top-k of iid scores).

    Draws with replacement and redraws the rows holding a repeat, which is exact and costs
    O(n k) instead of the O(n E) of sorting scores.
    """
    out = torch.randint(num_experts, (n, k), generator=gen)
    bad = torch.arange(n)
    while bad.numel():
        srt = out[bad].sort(1).values
        bad = bad[(srt[:, 1:] == srt[:, :-1]).any(1)]
        out[bad] = torch.randint(num_experts, (bad.numel(), k), generator=gen)
    return out


def _half_normal_inv(u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF of ``|randn|`` (``u`` in float64 near 1, where float32 would round to 1)."""
    top = 1 - 1e-16 if u.dtype == torch.float64 else 1 - 1e-7
    return torch.special.erfinv(u.clamp(0, top)) * 2 ** 0.5


def _group_limited(n: int, k: int, num_experts: int, num_nodes: int, groups: int,
                   gen: torch.Generator) -> torch.Tensor:
    """DeepEP's node-limited top-k of ``|randn| + 1`` scores, drawn from order statistics.

    Equivalent to :func:`group_limited_reference` but draws ``N + G * E/N`` numbers per token
    instead of ``E``: each node's maximum comes from the distribution of the maximum of ``E/N``
    scores (inverse CDF of ``u ** (N/E)``); the top ``G`` maxima choose the nodes; the other
    scores of a chosen node are independent draws below its maximum; the node maximum sits on
    a uniformly random expert of its node (scores are exchangeable). The ``+ 1`` shift does not
    change any ranking and is left out.
    """
    per = num_experts // num_nodes
    f64 = torch.float64
    maxima = _half_normal_inv(torch.rand(n, num_nodes, generator=gen, dtype=f64) ** (1.0 / per))
    top, node = torch.topk(maxima, groups, dim=1)  # [n, G]
    below = torch.special.erf(top / 2 ** 0.5).float()  # CDF at each chosen node's maximum
    rest = _half_normal_inv(torch.rand(n, groups, per - 1, generator=gen) * below[..., None])
    scores = torch.cat([top.float()[..., None], rest], 2).view(n, groups * per)
    slot = torch.topk(scores, k, dim=1).indices  # [n, k] into the G x per candidates
    offset = torch.randint(per, (n, groups), generator=gen)  # expert holding each node's max
    g, j = slot // per, slot % per
    expert_in_node = (offset.gather(1, g) + j) % per
    return node.gather(1, g) * per + expert_in_node


def group_limited_reference(n: int, k: int, num_experts: int, num_nodes: int, groups: int,
                            gen: torch.Generator) -> torch.Tensor:
    """DeepEP's ``test_internode.py`` routing written out: ``[n, k]`` expert ids."""
    scores = torch.randn(n, num_experts, generator=gen).abs() + 1
    per_node = scores.view(n, num_nodes, -1)
    keep = torch.topk(per_node.amax(2), groups, dim=1).indices
    mask = torch.zeros(n, num_nodes, dtype=torch.bool).scatter_(1, keep, True)
    return torch.topk((per_node * mask.unsqueeze(2)).view(n, num_experts), k, dim=1).indices
