"""Reference expert-parallel MoE layer on flexep: the served models' routers, grouped SwiGLU
experts, EPLB placements that change while serving.

Data flow of :class:`MoELayer` on every rank (shape legend below)::

    x [T, H] --gate, routing rule--> topk_idx [T, K] (logical), topk_weights [T, K]
      --placement--> physical ids --dispatch--> recv_x [M, H], recv_idx [M, K] (local ids)
      --grouped SwiGLU of the local experts, weighted by recv_topk_weights-->  [M, H]
      --combine (unweighted sum over ranks)--> [T, H]  (+ shared experts on x)

* **Routing** follows the configured model's rule (:mod:`flexep.moe.routing`; presets in
  :mod:`flexep.moe.config`). The gate runs in ``config.router_dtype`` (float32 by default).
* **Training / prefill** use normal-mode dispatch/combine through :mod:`flexep.autograd`, so
  gradients reach the tokens, the routing weights and every rank's experts. DeepEP's combine
  does not weight: each rank multiplies its local experts' outputs by the received weights and
  sums them per token first.
* **Decode** uses low-latency mode when the ``Buffer`` was built with ``low_latency_mode=True``:
  fixed-capacity per-expert slots, one ``bmm`` over them, and the weighted sum is done by
  ``low_latency_combine``.
* **Serving with EPLB**: :meth:`MoELayer.rebalance` turns the per-expert counts the layer keeps
  into a new placement and moves expert weights rank to rank (:mod:`flexep.moe.online`).
* EP world 1 runs the same code (dispatch and combine over a group of one).

Local experts run as one grouped matmul per projection: received (token, slot) pairs are sorted
by expert and multiplied segment by segment. Each expert sees exactly its tokens in global
(rank, token) order, whatever the EP size, so its matmul shapes and inputs do not depend on how
experts are sharded.

**Bitwise reproducibility.** With ``slotwise_combine=True`` a token's output is the same bits at
every EP size and under every EPLB placement (replicas included), when each rank holds a
contiguous shard of the global batch and every row of a matrix product is computed independently
of the other rows in the call. :mod:`flexep.moe.experts` makes that true for the CPU kernels
(float32 and bfloat16): it keeps elementwise kernels off their scalar tail and gives every
matrix product at least 4 rows, because BLAS computes one or two rows through other paths and
rounds differently (2.4e-7 measured when a replica received one token). GPU and NPU GEMM libraries pick
kernels by shape and promise no such thing. Without ``slotwise_combine`` (DeepEP's per-rank
pre-summed combine) outputs agree to float32 rounding: a rank adds the slots it holds before
the combine, and which slots share a rank changes with the EP size and the placement.

Shape legend: T tokens on this rank, H hidden, I expert intermediate size, K top-k, E logical
experts, P physical experts (E plus EPLB replicas), W ranks, L = P / W local experts, M tokens
received by this rank, G expert groups.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import autograd
from ..deepep.buffer import Buffer
from ..quant import per_token_cast_back
from . import online
from .config import MoEConfig
from .eplb import Placement
from .experts import (
    VECTOR_BLOCK,
    GroupedExperts,
    SwiGLU,
    grouped_mm,
    grouped_mm_loop,
    linear_rows,
    seeded_normal,
)
from .routing import route
from .slots import local_slots, served_rows, sum_slots_per_row, weighted_rows

__all__ = ["MoEConfig", "MoELayer", "GroupedExperts", "deepseek_v3_route", "grouped_mm", "grouped_mm_loop",
           "expert_parameters", "replicated_parameters", "all_reduce_replicated_grads", "mask_experts"]


def mask_experts(topk_idx: torch.Tensor, topk_weights: torch.Tensor, unavailable: torch.Tensor,
                 renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the slots routed to ``unavailable: [E] bool`` experts (no live copy after a loss).

    The dropped slots get id ``-1`` and weight 0. With ``renormalize`` the kept weights are scaled
    so that each token's weights keep their sum (a token whose every expert is gone gets
    zeros); without it the kept weights are unchanged (DeepEP's mask semantics: the lost experts
    contribute zero). Example: weights ``[0.5, 0.3, 0.2]``, expert of slot 1 gone -> ``[0.5, 0,
    0.2]``, renormalised ``[0.7143, 0, 0.2857]``.
    """
    gone = unavailable.to(topk_idx.device)[topk_idx.clamp(min=0)] & (topk_idx >= 0)
    kept = topk_weights.masked_fill(gone, 0.0)
    if renormalize:
        total, left = topk_weights.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)
        kept = torch.where(left > 0, kept * (total / torch.where(left > 0, left, 1.0)), 0.0)
    return topk_idx.masked_fill(gone, -1), kept


def deepseek_v3_route(logits: torch.Tensor, bias: torch.Tensor, topk: int, n_group: int = 1,
                      topk_group: int = 1, routed_scaling_factor: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing with a correction bias, in float32:
    ``route(logits.float(), "deepseek_v3", topk, bias=bias, ...)`` (see :func:`flexep.moe.route`).

    Returns ``topk_idx: [T, K] int64`` and ``topk_weights: [T, K] float32``.
    """
    return route(logits.float(), "deepseek_v3", topk, bias=bias, n_group=n_group, topk_group=topk_group,
                 routed_scaling_factor=routed_scaling_factor)


class MoELayer(torch.nn.Module):
    """Expert-parallel MoE layer over a flexep :class:`~flexep.Buffer`, routed as ``config`` says.

    Args:
        config: :class:`MoEConfig` (e.g. ``MoEConfig.preset("qwen3-30b-a3b")``).
        buffer: the EP ``Buffer``; its group's size W must divide the physical expert count.
            Build it with ``low_latency_mode=True`` to decode through low-latency kernels.
        placement: EPLB :class:`~flexep.eplb.Placement` mapping logical experts to physical
            replicas (default: one replica each, expert e on rank ``e // (E/W)``). Replicas
            are copies; to train with replicas call :func:`flexep.moe.sync_replica_grads` after
            backward (every copy then gets the whole expert's gradient).
        seed: initial weights come from generators keyed by (seed, parameter, logical expert),
            so the same seed gives the same model at every EP size and placement.
        dtype: parameter dtype (routing runs in ``config.router_dtype``, combine accumulates in
            float32).
        slotwise_combine: return one row per (token, top-k slot) instead of one pre-summed row
            per token (K combines instead of one). The slot sum then runs at the source in slot
            order, so outputs are bitwise independent of EP size and placement (conditions in
            the module docstring), for K times the combine bytes. In low-latency mode it runs
            one weighted combine per slot (the other slots' weights zero) for the same result.
        num_max_dispatch_tokens_per_rank: capacity of low-latency decode (tokens per rank).
        fp8_decode: low-latency dispatch sends FP8 e4m3 with per-128-channel scales (DeepEP's
            default, half the bytes of bf16); experts run on the dequantised tokens. Needs
            ``hidden % 128 == 0``.

    ``forward(x: [T, H]) -> [T, H]``. Statistics (non-persistent buffers): ``tokens_per_expert``
    (``[E] int64``, the (token, expert) choices of this rank's tokens; consumed by
    :meth:`update_routing_bias` and :meth:`rebalance`) and ``tokens_per_slot`` (``[L] int64``,
    (token, slot) pairs this rank's expert slots served since the placement took effect; its sum
    is this rank's load).
    """

    def __init__(self, config: MoEConfig, buffer: Buffer, *, placement: Optional[Placement] = None,
                 seed: int = 0, dtype: torch.dtype = torch.float32, slotwise_combine: bool = False,
                 num_max_dispatch_tokens_per_rank: int = 128, fp8_decode: bool = False) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        if not isinstance(buffer, Buffer):
            raise TypeError(f"buffer must be a flexep.Buffer, got {type(buffer).__name__}")
        world, rank = buffer.group_size, buffer.rank
        if placement is None:
            if config.num_experts % world:
                raise ValueError(f"config.num_experts ({config.num_experts}) must be divisible by "
                                 f"the EP group size ({world})")
            placement = Placement.identity(config.num_experts, world)
        self.config, self.buffer = config, buffer
        self._check_placement(placement)
        self.placement = placement
        self.slotwise_combine = bool(slotwise_combine)
        self.num_max_dispatch_tokens_per_rank = int(num_max_dispatch_tokens_per_rank)
        if fp8_decode and config.hidden % 128:
            raise ValueError(f"fp8_decode needs hidden divisible by 128 (per-128-channel scales), "
                             f"got hidden={config.hidden}")
        self.fp8_decode = bool(fp8_decode)
        local = placement.experts_per_rank
        e, h = config.num_experts, config.hidden
        self.gate_weight = torch.nn.Parameter(seeded_normal((e, h), h ** -0.5, seed, "gate").to(dtype))
        self.gate_bias = (torch.nn.Parameter(seeded_normal((e,), 0.1, seed, "gate_bias").to(dtype))
                          if config.router_bias else None)
        if config.has_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(e))
        else:
            self.e_score_correction_bias = None
        self.register_buffer("tokens_per_expert", torch.zeros(e, dtype=torch.int64), persistent=False)
        self.register_buffer("tokens_per_slot", torch.zeros(local, dtype=torch.int64), persistent=False)
        self.experts = GroupedExperts.seeded(placement.physical_to_logical[rank * local:(rank + 1) * local],
                                             h, config.intermediate, seed, dtype)
        self.shared = (SwiGLU(h, config.num_shared_experts * config.intermediate, seed, dtype,
                              gated=config.shared_expert_gate) if config.num_shared_experts else None)
        self.unavailable: Optional[torch.Tensor] = None  # [E] bool, see set_unavailable
        self.renormalize_unavailable = False

    def set_unavailable(self, experts, renormalize: bool = False) -> None:
        """Route around logical ``experts`` that have no live copy (:func:`mask_experts`);
        ``None`` or empty restores normal routing. Used by :mod:`flexep.elastic`'s mask
        policies; routing statistics still count the demand for them."""
        experts = list(experts or [])
        self.unavailable = None
        if experts:
            self.unavailable = torch.zeros(self.config.num_experts, dtype=torch.bool)
            self.unavailable[experts] = True
        self.renormalize_unavailable = bool(renormalize)

    def _check_placement(self, placement: Placement) -> None:
        world, experts = self.buffer.group_size, self.config.num_experts
        if not isinstance(placement, Placement):
            raise TypeError(f"placement must be a flexep.eplb.Placement, got {type(placement).__name__}")
        if placement.num_logical != experts or placement.num_ranks != world:
            raise ValueError(f"placement is for {placement.num_logical} experts on {placement.num_ranks} "
                             f"ranks, expected {experts} experts on {world} ranks")

    # ---- routing ---------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [T, H]`` -> logical ``topk_idx [T, K] int64``, ``topk_weights [T, K] float32``.

        The gate (``x @ gate_weight.T`` plus ``gate_bias``) runs in ``config.router_dtype``;
        the rule's weights are widened to float32 exactly. The logits are padded with zero
        rows to a whole vector block, so a sigmoid's bits do not depend on T (rows are routed
        independently, so the padding changes nothing else).
        """
        c = self.config
        dt = c.router_dtype
        bias = self.gate_bias.to(dt) if self.gate_bias is not None else None
        logits = linear_rows(x.to(dt), self.gate_weight.to(dt), bias)
        num_tokens = logits.size(0)
        pad = (-num_tokens) % (VECTOR_BLOCK // math.gcd(c.num_experts, VECTOR_BLOCK))
        idx, weights = route(F.pad(logits, (0, 0, 0, pad)), c.routing, c.topk,
                             bias=self.e_score_correction_bias, n_group=c.n_group, topk_group=c.topk_group,
                             renormalize=c.renormalizes, routed_scaling_factor=c.routed_scaling_factor)
        return idx[:num_tokens], weights[:num_tokens].float()

    @torch.no_grad()
    def update_routing_bias(self) -> torch.Tensor:
        """Aux-loss-free balancing step (collective over the buffer's group).

        Sums ``tokens_per_expert`` over the group, moves each expert's correction bias (if the
        config has one) by ``bias_update_speed`` towards the mean load (up if under-loaded,
        down if over-loaded), resets the counters and returns the global load ``[E] int64``.
        """
        load = self.collect_load()
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias += self.config.bias_update_speed * torch.sign(
                load.double().mean() - load.double()).float()
        return load

    @torch.no_grad()
    def collect_load(self) -> torch.Tensor:
        """``tokens_per_expert`` summed over the group (``[E] int64``), then reset (collective)."""
        load = self.tokens_per_expert.clone()
        dist.all_reduce(load, group=self.buffer.group)
        self.tokens_per_expert.zero_()
        return load

    # ---- placement -------------------------------------------------------------------------
    @torch.no_grad()
    def apply_placement(self, placement: Placement) -> online.Moved:
        """Move the expert weights to a new EPLB placement (collective over the buffer's group).

        Every rank must pass the same placement (checked: a difference raises
        :class:`~flexep.errors.RankMismatchError` on every rank before anything moves). Each
        new slot copies its expert from this rank if it already holds it, else from a replica
        on its node, else from the lowest rank holding one, through
        :func:`flexep.moe.weights.fetch_rows` (each expert crosses to a rank at most once).
        Parameters are replaced, so optimizer state does not carry over: an inference-time
        operation (train with one replica per expert). Returns the rows and bytes moved.
        """
        self._check_placement(placement)
        moved = online.move_experts(self.buffer.comm, self.placement, placement, self.experts)
        self.experts = moved.experts
        self.placement = placement
        self.tokens_per_slot = torch.zeros(placement.experts_per_rank, dtype=torch.int64,
                                           device=self.tokens_per_slot.device)
        return moved.report

    def rebalance(self, load: Optional[torch.Tensor] = None, *, num_physical: Optional[int] = None,
                  num_groups: Optional[int] = None, num_nodes: Optional[int] = None, refine: bool = True,
                  min_improvement: float = 0.0) -> online.RebalanceReport:
        """Re-place the experts for the load observed while serving, and move them (collective).

        Args:
            load: ``[E]`` per-expert load; default: :meth:`collect_load` (the tokens routed
                since the last call, summed over the group; the counters restart).
            num_physical: P of the new placement (default: the current one).
            num_groups: expert groups for the hierarchical policy (default ``config.n_group``).
            num_nodes: nodes of the EP group (default: the buffer's topology).
            refine: flexep's refined placement (True) or DeepSeek's greedy one.
            min_improvement: move only if the busiest rank's expected load drops by at least
                this fraction (0: whenever it drops at all).

        Returns a :class:`~flexep.moe.online.RebalanceReport` (imbalance before and after,
        rows and bytes moved). Outputs do not change (bitwise with ``slotwise_combine``).
        """
        if load is None:
            load = self.collect_load()
        return online.rebalance_layer(self, load, num_physical=num_physical, num_groups=num_groups,
                                      num_nodes=num_nodes, refine=refine, min_improvement=min_improvement)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, low_latency: Optional[bool] = None) -> torch.Tensor:
        """``x: [T, H]`` (dtype of the parameters) -> ``[T, H]``. Collective over the group.

        ``low_latency`` (default: the buffer's ``low_latency_mode``) picks the decode path,
        which is inference only.
        """
        if x.dim() != 2 or x.size(1) != self.config.hidden:
            raise ValueError(f"x must be [T, {self.config.hidden}], got shape {tuple(x.shape)}")
        topk_idx, topk_weights = self.route(x)
        with torch.no_grad():
            self.tokens_per_expert += torch.bincount(topk_idx.flatten(), minlength=self.config.num_experts)
        if self.unavailable is not None:
            topk_idx, topk_weights = mask_experts(topk_idx, topk_weights, self.unavailable,
                                                  self.renormalize_unavailable)
        physical = self.placement.to_physical(topk_idx, token_offset=self.buffer.rank)
        if self.buffer.low_latency_mode if low_latency is None else low_latency:
            out = self._routed_low_latency(x, physical, topk_weights)
        else:
            out = self._routed_normal(x, physical, topk_weights)
        return out if self.shared is None else out + self.shared(x)

    def _routed_normal(self, x: torch.Tensor, topk_idx: torch.Tensor,
                       topk_weights: torch.Tensor) -> torch.Tensor:
        k = topk_idx.size(1)
        recv_x, recv_idx, recv_w, _, handle = autograd.dispatch(
            self.buffer, x, topk_idx, topk_weights, self.placement.num_physical)
        m = recv_x.size(0)
        served = local_slots(recv_idx, self.placement.experts_per_rank)
        pos, counts = served.pos, served.counts
        with torch.no_grad():
            self.tokens_per_slot += counts
        # Weighting and the slot sum run in float32 and round once to x's dtype (as DeepEP's
        # combine accumulates); for float32 models this is plain float32 arithmetic.
        rows, weights = served_rows(recv_x, recv_w, served)
        y = weighted_rows(self.experts(rows, counts), weights)
        if self.slotwise_combine:
            # One combine per slot: each sums one non-zero row (the slot's expert lives on one
            # rank) with zeros, which is exact. (Buffer.combine keeps the dispatch's hidden
            # size, so the K slots cannot travel as one [M, K*H] row.)
            per_slot = y.new_zeros(m * k, x.size(1)).index_put((pos,), y).view(m, k, x.size(1))
            outs = [autograd.combine(self.buffer, per_slot[:, j].to(x.dtype).contiguous(), handle)
                    for j in range(k)]
            return _sum_slots(torch.stack(outs, 1).float()).to(x.dtype)
        return autograd.combine(self.buffer, sum_slots_per_row(y, served, m).to(x.dtype), handle)

    def _routed_low_latency(self, x: torch.Tensor, topk_idx: torch.Tensor,
                            topk_weights: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.gate_weight.requires_grad):
            raise RuntimeError("the low-latency path is inference only: run it under "
                               "torch.no_grad() / torch.inference_mode(), or pass low_latency=False")
        if not self.buffer.low_latency_mode:
            raise ValueError("low_latency=True needs a Buffer built with low_latency_mode=True")
        recv_x, count, handle, _event, _hook = self.buffer.low_latency_dispatch(
            x, topk_idx, self.num_max_dispatch_tokens_per_rank, self.placement.num_physical,
            use_fp8=self.fp8_decode)
        self.tokens_per_slot += count.to(torch.int64)
        if isinstance(recv_x, tuple):  # (e4m3 [L, W*M, H], float32 scales [L, W*M, H/128])
            recv_x = per_token_cast_back(*recv_x, dtype=x.dtype)
        # Static shapes (CUDA-graph friendly): every slot is computed, the combine reads only
        # the valid ones.
        y = self.experts.forward_padded(recv_x)
        if self.slotwise_combine:
            # One weighted combine per slot with the other slots' weights zero: each token's
            # result is one product w * y (exact), summed here in slot order like the normal path.
            outs = []
            for j in range(topk_weights.size(1)):
                only = torch.zeros_like(topk_weights)
                only[:, j] = topk_weights[:, j]
                outs.append(self.buffer.low_latency_combine(y, topk_idx, only, handle)[0])
            return _sum_slots(torch.stack(outs, 1).float()).to(x.dtype)
        out, _event, _hook = self.buffer.low_latency_combine(y, topk_idx, topk_weights, handle)
        return out


def _sum_slots(per_slot: torch.Tensor) -> torch.Tensor:
    """``[N, K, H] -> [N, H]`` summed in slot order 0, 1, ..., K-1 (a fixed order on purpose)."""
    out = per_slot[:, 0]
    for k in range(1, per_slot.size(1)):
        out = out + per_slot[:, k]
    return out


def expert_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of every expert-sharded parameter under ``module``."""
    for name, sub in module.named_modules():
        if isinstance(sub, GroupedExperts):
            for pname, p in sub.named_parameters(recurse=False):
                yield f"{name}.{pname}" if name else pname, p


def replicated_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of every parameter replicated on all EP ranks (router, shared, ...)."""
    sharded = {id(p) for _, p in expert_parameters(module)}
    for name, p in module.named_parameters():
        if id(p) not in sharded:
            yield name, p


def all_reduce_replicated_grads(module: torch.nn.Module, group: Optional[dist.ProcessGroup] = None,
                                average: bool = False) -> None:
    """Sum (or average) the gradients of replicated parameters over ``group``, one flat all-reduce.

    Expert gradients need no reduction: the backward of dispatch/combine already brings every
    rank's tokens to the experts. With a loss normalised by the *global* token count, summing
    gives exactly the single-process gradient.
    """
    params = [p for _, p in replicated_parameters(module) if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat, group=group)
    if average:
        flat /= dist.get_world_size(group)
    for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))
