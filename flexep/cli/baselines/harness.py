"""What every framework driver shares: one forward pass timed in two phases, a stand-in expert
whose output can be checked, the single-process reference, and the check.

A driver replays the steps its framework's MoE layer takes around the experts:

    dispatch  routing metadata from (topk_idx, topk_weights), the dispatcher's dispatch,
              and the reorder to expert-major rows                             (timed)
    expert    the stand-in: local expert e multiplies its rows by s_e          (not timed)
    combine   the weighting of expert outputs the layer does, the dispatcher's
              combine back to [T, H]                                           (timed)

Shape legend (as in :mod:`flexep.algorithms.contract`): T tokens on this rank, H hidden, K top-k,
E experts, W ranks, L = E / W local experts, R (token, expert) pairs this rank's experts receive.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch
import torch.distributed as dist

from ..common import timed

__all__ = ["Step", "Driver", "expert_scales", "stand_in_expert", "reference_combine",
           "expected_dispatch", "combine_rtol", "verify", "run"]


@dataclass(frozen=True)
class Step:
    """One forward pass on this rank.

    Attributes:
        rows: ``[R, H]`` bf16, what the local experts received, expert-major.
        counts: ``[L] int64``, rows per local expert.
        weights: ``[R] float32`` routing weight of each row, where the dispatcher delivers them
            with the rows (None where it keeps them to itself until combine).
        out: ``[T, H]`` bf16, the combined output.
    """

    rows: torch.Tensor
    counts: torch.Tensor
    weights: Optional[torch.Tensor]
    out: torch.Tensor


class Driver:
    """One framework's dispatcher on this rank, built on ``x: [T, H] bf16``, ``topk_idx: [T, K]
    int64`` (no unused slots), ``topk_weights: [T, K] float32`` and E experts over the group.

    Subclasses implement :meth:`dispatch` and :meth:`combine` as their layer calls them and may
    wrap a pass in :meth:`context` (process-wide settings needed only while it runs).
    """

    label = ""

    def __init__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 experts: int, group: Optional[dist.ProcessGroup] = None) -> None:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if experts % world:
            raise ValueError(f"experts ({experts}) must be divisible by the group size ({world})")
        if topk_idx.numel() and int(topk_idx.min()) < 0:
            raise ValueError("topk_idx must route every slot (no -1): the framework dispatchers "
                             "have no unused-slot marker")
        self.x, self.topk_idx, self.topk_weights = x, topk_idx, topk_weights
        self.experts, self.world, self.rank, self.group = experts, world, rank, group
        self.local = experts // world
        scales = expert_scales(experts, x.device)
        self.local_scales = scales[rank * self.local:(rank + 1) * self.local]

    def context(self) -> ContextManager:
        return contextlib.nullcontext()

    def dispatch(self) -> tuple:
        """-> ``(rows [R, H], counts [L], weights [R] or None, state for combine)``."""
        raise NotImplementedError

    def expert(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return stand_in_expert(rows, counts, self.local_scales)

    def combine(self, expert_out: torch.Tensor, state) -> torch.Tensor:
        """``expert_out: [R, H]`` -> ``[T, H]``, weighting included."""
        raise NotImplementedError

    def step(self) -> tuple[dict, Step]:
        """One pass: ``({"dispatch": (wall s, cpu s), "combine": (wall s, cpu s)}, Step)``."""
        with self.context(), torch.no_grad():
            (rows, counts, weights, state), t_dispatch = timed(self.dispatch)
            y = self.expert(rows, counts)
            out, t_combine = timed(self.combine, y, state)
        counts = torch.as_tensor(counts).to(torch.int64).cpu()
        return {"dispatch": t_dispatch, "combine": t_combine}, Step(rows, counts, weights, out)


def expert_scales(experts: int, device: torch.device) -> torch.Tensor:
    """``[E] float32``: s_e = 1 + (e % 16) / 4, exact in bf16 (1, 1.25, ..., 4.75, then again)."""
    return 1.0 + (torch.arange(experts, device=device) % 16).float() / 4.0


def stand_in_expert(rows: torch.Tensor, counts: torch.Tensor, local_scales: torch.Tensor) -> torch.Tensor:
    """``rows: [R, H]`` grouped by local expert, ``counts: [L]`` -> ``[R, H]``: rows of local
    expert l times ``local_scales[l]``, in the rows' dtype."""
    counts = torch.as_tensor(counts).to(device=rows.device, dtype=torch.int64)
    per_row = local_scales.to(rows.dtype).repeat_interleave(counts, output_size=rows.size(0))
    return rows * per_row.unsqueeze(1)


def reference_combine(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                      scales: torch.Tensor) -> torch.Tensor:
    """``[T, H] float32``: ``out[t] = sum_k w[t, k] * s[idx[t, k]] * x[t]``, in float64."""
    coef = (topk_weights.double() * scales.double()[topk_idx]).sum(1)
    return (x.double() * coef.unsqueeze(1)).float()


def gather_inputs(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                  group: Optional[dist.ProcessGroup]) -> list:
    """Every rank's ``(x, topk_idx, topk_weights)`` on the host (same T on every rank)."""
    world = dist.get_world_size(group)
    out = []
    # bf16 travels as bytes: not every backend gathers bf16 (Gloo has no 16-bit types).
    for t in (x.view(torch.uint8), topk_idx, topk_weights):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=group)
        out.append([p.cpu() for p in parts])
    xs, idxs, ws = out
    return [(xs[r].view(torch.bfloat16), idxs[r], ws[r]) for r in range(world)]


def expected_dispatch(rank: int, inputs: list, local: int) -> tuple:
    """What rank ``rank``'s experts must receive from every rank's ``inputs``.

    Expert-major, then source rank, then token order: ``(rows [R, H], weights [R], counts [L])``.
    Example (W = 2, L = 1, K = 1): rank 0's tokens routed to experts [1, 0], rank 1's to
    [0, 0] -> rank 0 receives x0[1], x1[0], x1[1] (counts [3]); rank 1 receives x0[0].
    """
    world = len(inputs)
    keys, rows, weights = [], [], []
    for src, (x, idx, w) in enumerate(inputs):
        expert = idx.flatten()
        token = torch.arange(expert.numel()) // idx.size(1)
        mine = (expert >= rank * local) & (expert < (rank + 1) * local)
        keys.append((expert[mine] - rank * local) * world + src)
        rows.append(x[token[mine]])
        weights.append(w.flatten()[mine])
    key = torch.cat(keys)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key // world, minlength=local)
    return torch.cat(rows)[order], torch.cat(weights)[order], counts


def combine_rtol(topk: int) -> float:
    """Bound on ``|out - ref| / |ref|`` for bf16 pipelines with positive weights and scales.

    All K terms of an output element share its sign, so every partial sum is at most ``|ref|``;
    the roundings (the expert's product, the weighted cast, K additions in bf16) stay below
    ``(K + 2) * 2^-9 * |ref|``; one more ulp of headroom.
    """
    return (topk + 3) * 2.0 ** -9


def verify(label: str, step: Step, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
           experts: int, group: Optional[dist.ProcessGroup]) -> dict:
    """Check one pass on every rank against the reference (collective); raise on any failure.

    Dispatch exactly (rows, counts, and weights where delivered); combine within
    :func:`combine_rtol`. Returns ``{"dispatch_exact": bool, "combine_max_rel_err": float}``.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = experts // world
    rows, weights, counts = expected_dispatch(rank, gather_inputs(x, topk_idx, topk_weights, group),
                                              local)
    got_rows = step.rows.cpu()
    exact = got_rows.shape == rows.shape and torch.equal(got_rows, rows) and torch.equal(step.counts, counts)
    if step.weights is not None:
        got_w = step.weights.cpu().float()
        exact = exact and got_w.shape == weights.shape and torch.equal(got_w, weights)
    ref = reference_combine(x.cpu(), topk_idx.cpu(), topk_weights.cpu(), expert_scales(experts, "cpu"))
    out = step.out.cpu().float().reshape(ref.shape)
    err = (out - ref).abs()
    rtol = combine_rtol(topk_idx.size(1))
    ok = bool((err <= rtol * ref.abs() + 1e-6).all())
    rel = float((err / ref.abs().clamp_min(1e-6)).max()) if err.numel() else 0.0
    flags = torch.tensor([int(exact), int(ok)], dtype=torch.int64, device=x.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    worst = torch.tensor([rel], dtype=torch.float64, device=x.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    if not bool(flags[0]) or not bool(flags[1]):
        raise RuntimeError(f"{label} failed its check: dispatch exact {bool(flags[0])}, combine within "
                           f"{rtol:.4f} of the reference {bool(flags[1])} (max relative error "
                           f"{float(worst[0]):.4f})")
    return {"dispatch_exact": True, "combine_max_rel_err": float(worst[0]), "combine_rtol": rtol}


def run(driver: Driver, iters: int = 5, warmup: int = 1) -> dict:
    """Check one pass, then time ``warmup + iters`` passes; ``{"dispatch": [(wall, cpu), ...],
    "combine": [...]}`` of the timed ones, as :func:`flexep.cli.common.timed` samples."""
    _, first = driver.step()
    verify(driver.label, first, driver.x, driver.topk_idx, driver.topk_weights, driver.experts,
           driver.group)
    samples: dict = {"dispatch": [], "combine": []}
    for it in range(warmup + iters):
        times, _ = driver.step()
        if it >= warmup:
            for phase, t in times.items():
                samples[phase].append(t)
    return samples
