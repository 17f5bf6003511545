"""Reference expert-parallel MoE layer on flexep: DeepSeek-V3 routing, grouped SwiGLU experts.

Data flow of :class:`MoELayer` on every rank (shape legend below)::

    x [T, H] --router--> topk_idx [T, K] (logical), topk_weights [T, K]
      --placement--> physical ids --dispatch--> recv_x [M, H], recv_idx [M, K] (local ids)
      --grouped SwiGLU of the local experts, weighted by recv_topk_weights-->  [M, H]
      --combine (unweighted sum over ranks)--> [T, H]  (+ shared experts on x)

* **Training / prefill** use normal-mode dispatch/combine through :mod:`flexep.autograd`, so
  gradients reach the tokens, the routing weights and every rank's experts. DeepEP's combine
  does not weight: each rank multiplies its local experts' outputs by the received weights and
  sums them per token first.
* **Decode** uses low-latency mode when the ``Buffer`` was built with ``low_latency_mode=True``:
  fixed-capacity per-expert slots, one ``bmm`` over them, and the weighted sum is done by
  ``low_latency_combine``.
* EP world 1 runs the same code (dispatch and combine over a group of one).

Local experts run as one grouped matmul per projection: received (token, slot) pairs are sorted
by expert and multiplied segment by segment (``torch._grouped_mm`` where PyTorch has it, a loop
over segments otherwise). Each expert sees exactly its tokens in global (rank, token) order,
whatever the EP size, so its matmul shapes and inputs do not depend on how experts are sharded.

Same outputs at every EP size (train on N ranks, serve on M), whichever rank holds a token and
however the batch is split: bit for bit with ``slotwise_combine=True``, to float32 rounding
otherwise (DeepEP's combine adds per-rank partial sums, grouped differently at each EP size).
Bitwise equality also needs pointwise kernels whose result does not depend on the tensor size
(:func:`_pointwise`) and GEMM rows that do not depend on the row count. CPU BLAS computes a
single row with a different kernel (gemv), so on CPU every GEMM gets at least ``MIN_ROWS`` rows
(:func:`_rows`; an expert segment of 1 token is padded with zero rows); with that the CPU
kernels tested here give equal rows, which is not promised by every BLAS or GPU library.

Shape legend: T tokens on this rank, H hidden, I expert intermediate size, K top-k, E logical
experts, P physical experts (E plus EPLB replicas), W ranks, L = P / W local experts, M tokens
received by this rank, G expert groups.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import autograd
from ..deepep.buffer import Buffer
from ..quant import per_token_cast_back
from .eplb import Placement

__all__ = ["MoEConfig", "MoELayer", "GroupedExperts", "deepseek_v3_route", "grouped_mm",
           "expert_parameters", "replicated_parameters", "all_reduce_replicated_grads", "mask_experts"]


@dataclass(frozen=True)
class MoEConfig:
    """Sizes and routing hyper-parameters of one MoE layer (DeepSeek-V3 names in brackets).

    Attributes:
        hidden: H [hidden_size].
        intermediate: I of each routed expert [moe_intermediate_size].
        num_experts: E logical routed experts [n_routed_experts].
        topk: K experts per token [num_experts_per_tok].
        n_group: G expert groups for group-limited routing [n_group]; 1 disables it.
        topk_group: groups a token may use [topk_group].
        routed_scaling_factor: multiplies the normalised routing weights.
        num_shared_experts: shared experts, run on every token as one SwiGLU of width
            ``num_shared_experts * intermediate`` [n_shared_experts]; 0 for none.
        bias_update_speed: step of the aux-loss-free bias update (``gamma`` in the paper).
    """

    hidden: int
    intermediate: int
    num_experts: int
    topk: int
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    bias_update_speed: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "num_experts", "topk", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.num_shared_experts < 0:
            raise ValueError(f"MoEConfig.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.num_experts % self.n_group:
            raise ValueError(f"MoEConfig.num_experts ({self.num_experts}) must be divisible by "
                             f"n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            raise ValueError(f"MoEConfig.topk_group ({self.topk_group}) must be <= n_group "
                             f"({self.n_group})")
        reachable = self.topk_group * (self.num_experts // self.n_group)
        if self.topk > reachable:
            raise ValueError(f"MoEConfig.topk ({self.topk}) must be <= the experts in topk_group "
                             f"groups ({self.topk_group} x {self.num_experts // self.n_group} = "
                             f"{reachable})")


# PyTorch's CPU elementwise kernels compute the last ``numel % (2 x vector width)`` elements with
# scalar code whose exp() can differ from the vector one in the last bit, so an element's value
# would depend on how many tokens share the call (i.e. on the EP size). Padding the flat tensor to
# a multiple of this block keeps every element on the vector path.
_VECTOR_BLOCK = 256


def _pointwise(fn, t: torch.Tensor) -> torch.Tensor:
    """``fn(t)`` for an elementwise ``fn``, with each element's bits independent of ``t.numel()``."""
    n = t.numel()
    flat = F.pad(t.reshape(-1), (0, (-n) % _VECTOR_BLOCK))
    return fn(flat)[:n].view(t.shape)


# Fewest rows a CPU GEMM gets (see the module docstring): BLAS takes another path for one row.
MIN_ROWS = 4


def _rows(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for a row-wise ``fn`` (a GEMM), run on at least ``MIN_ROWS`` rows on CPU so that
    each row's bits do not depend on how many rows share the call."""
    n = x.size(0)
    if n >= MIN_ROWS or x.device.type != "cpu":
        return fn(x)
    return fn(F.pad(x, (0, 0, 0, MIN_ROWS - n)))[:n]


def _seeded_normal(shape: tuple, std: float, seed: int, name: str, index: int = 0) -> torch.Tensor:
    """A float32 normal tensor from a generator keyed by (seed, name, index): world-size free."""
    gen = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(f"{name}:{index}".encode()))
    return torch.randn(shape, generator=gen) * std


def deepseek_v3_route(logits: torch.Tensor, bias: torch.Tensor, topk: int, n_group: int = 1,
                      topk_group: int = 1, routed_scaling_factor: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing of ``logits: [T, E]`` (the gate's ``x @ W.T``).

    1. ``scores = sigmoid(logits)`` in float32.
    2. Selection uses ``scores + bias`` (``bias: [E]``, aux-loss-free balancing); the bias never
       enters the weights and receives no gradient.
    3. Group-limited: experts form ``n_group`` contiguous groups; a group's score is the sum of
       its two best biased scores (its best one if groups have one expert); only the
       ``topk_group`` best groups stay eligible.
    4. The ``topk`` best eligible experts are chosen, best first.
    5. Weights are their *unbiased* scores, normalised to sum 1, times ``routed_scaling_factor``.

    Returns ``topk_idx: [T, K] int64`` and ``topk_weights: [T, K] float32`` (differentiable
    with respect to ``logits``).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {tuple(logits.shape)}")
    num_tokens, num_experts = logits.shape
    if bias.shape != (num_experts,):
        raise ValueError(f"bias must be [{num_experts}], got shape {tuple(bias.shape)}")
    if num_experts % n_group:
        raise ValueError(f"the number of experts ({num_experts}) must be divisible by n_group ({n_group})")
    scores = _pointwise(torch.sigmoid, logits.float())
    biased = scores.detach() + bias.detach().float()
    if n_group > 1:
        grouped = biased.view(num_tokens, n_group, num_experts // n_group)
        group_scores = grouped.topk(min(2, grouped.size(-1)), dim=-1).values.sum(-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        eligible = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        biased = grouped.masked_fill(~eligible.unsqueeze(-1), float("-inf")).flatten(1)
    topk_idx = biased.topk(topk, dim=-1).indices
    weights = scores.gather(1, topk_idx)
    weights = weights / weights.sum(-1, keepdim=True) * routed_scaling_factor
    return topk_idx, weights


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


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Segment matmul: rows ``[offs[e-1], offs[e])`` of ``x: [S, A]`` times ``w[e]: [A, B]``.

    ``counts: [L] int64`` rows per segment (summing to S). Returns ``[S, B]``. On CPU uses
    ``torch._grouped_mm`` when PyTorch provides it and the row strides are multiples of 16 bytes
    (its requirement), else one ``mm`` per segment; both give the same result (tested). On
    accelerators the loop runs: their grouped GEMMs have dtype and architecture limits that a
    device-neutral reference should not guess.
    """
    if x.device.type == "cpu":
        sizes = counts.tolist()
        if any(0 < n < MIN_ROWS for n in sizes):
            return _grouped_mm_padded(x, w, sizes)
    strides = (*x.stride()[:-1], *w.stride()[:-1])
    if hasattr(torch, "_grouped_mm") and x.device.type == "cpu" and x.stride(-1) == 1 \
            and w.stride(-1) == 1 and all(s * x.element_size() % 16 == 0 for s in strides):
        return torch._grouped_mm(x, w, offs=torch.cumsum(counts, 0).to(torch.int32))
    return grouped_mm_loop(x, w, counts)


def _grouped_mm_padded(x: torch.Tensor, w: torch.Tensor, sizes: list) -> torch.Tensor:
    """:func:`grouped_mm` with every non-empty segment padded to ``MIN_ROWS`` rows (zeros).

    Example (MIN_ROWS 4): sizes ``[1, 0, 5]`` -> rows ``[0, z, z, z, 1, 2, 3, 4, 5]`` (z a zero
    row); the result keeps positions 0 and 4..8.
    """
    pick, keep, offset = [], [], 0
    for n in sizes:
        keep += range(len(pick), len(pick) + n)
        pick += list(range(offset, offset + n)) + [x.size(0)] * (max(n, MIN_ROWS) - n if n else 0)
        offset += n
    padded = torch.cat([x, x.new_zeros(1, x.size(1))])[pick]
    counts = torch.tensor([max(n, MIN_ROWS) if n else 0 for n in sizes], dtype=torch.int64)
    return grouped_mm(padded, w, counts)[keep]


def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The fallback of :func:`grouped_mm`: one ``mm`` per segment."""
    parts = torch.split(x, counts.tolist())
    return torch.cat([p @ w[e] for e, p in enumerate(parts)]) if parts else x.new_zeros(0, w.size(-1))


class GroupedExperts(torch.nn.Module):
    """The L SwiGLU experts of this rank: ``down(silu(x @ w_gate) * (x @ w_up))``.

    Parameters: ``w_gate, w_up: [L, H, I]``, ``w_down: [L, I, H]``. ``logical_ids: [L] int64``
    (buffer) names the logical expert held by each local slot; checkpoints key weights by it.
    """

    def __init__(self, logical_ids: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logical_ids", logical_ids.to(torch.int64).clone(), persistent=False)
        self.w_gate = torch.nn.Parameter(w_gate)
        self.w_up = torch.nn.Parameter(w_up)
        self.w_down = torch.nn.Parameter(w_down)

    @classmethod
    def seeded(cls, logical_ids: torch.Tensor, hidden: int, intermediate: int, seed: int,
               dtype: torch.dtype = torch.float32) -> GroupedExperts:
        """Experts initialised per logical id (a replica is a copy), independent of placement."""
        def init(name: str, shape: tuple, std: float) -> torch.Tensor:
            rows = [_seeded_normal(shape, std, seed, f"experts.{name}", e) for e in logical_ids.tolist()]
            return torch.stack(rows).to(dtype)
        return cls(logical_ids, init("w_gate", (hidden, intermediate), hidden ** -0.5),
                   init("w_up", (hidden, intermediate), hidden ** -0.5),
                   init("w_down", (intermediate, hidden), intermediate ** -0.5))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x: [S, H]`` rows sorted by local expert, ``counts: [L] int64`` -> ``[S, H]``."""
        h = _pointwise(F.silu, grouped_mm(x, self.w_gate, counts)) * grouped_mm(x, self.w_up, counts)
        return grouped_mm(h, self.w_down, counts)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [L, C, H]`` fixed-capacity slots -> ``[L, C, H]`` with one ``bmm`` per projection."""
        h = F.silu(torch.bmm(x, self.w_gate)) * torch.bmm(x, self.w_up)
        return torch.bmm(h, self.w_down)


class SwiGLU(torch.nn.Module):
    """Dense SwiGLU MLP ``[T, H] -> [T, H]`` (the shared experts), seeded like the experts."""

    def __init__(self, hidden: int, intermediate: int, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.w_gate = torch.nn.Parameter(_seeded_normal((hidden, intermediate), hidden ** -0.5, seed,
                                                        "shared.w_gate").to(dtype))
        self.w_up = torch.nn.Parameter(_seeded_normal((hidden, intermediate), hidden ** -0.5, seed,
                                                      "shared.w_up").to(dtype))
        self.w_down = torch.nn.Parameter(_seeded_normal((intermediate, hidden), intermediate ** -0.5,
                                                        seed, "shared.w_down").to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rows(lambda x: (_pointwise(F.silu, x @ self.w_gate) * (x @ self.w_up)) @ self.w_down, x)


class MoELayer(torch.nn.Module):
    """Expert-parallel DeepSeek-V3 MoE layer over a flexep :class:`~flexep.Buffer`.

    Args:
        config: :class:`MoEConfig`.
        buffer: the EP ``Buffer``; its group's size W must divide the physical expert count.
            Build it with ``low_latency_mode=True`` to decode through low-latency kernels.
        placement: EPLB :class:`~flexep.eplb.Placement` mapping logical experts to physical
            replicas (default: one replica each, expert e on rank ``e // (E/W)``). Replicas
            are copies; training keeps the default (replica gradients are not synchronised).
        seed: initial weights come from generators keyed by (seed, parameter, logical expert),
            so the same seed gives the same model at every EP size and placement.
        dtype: parameter dtype (router scores and combine accumulate in float32 regardless).
        slotwise_combine: return one row per (token, top-k slot) instead of one pre-summed row
            per token (K combines instead of one). The slot sum then runs at the source in slot
            order, so outputs are bitwise independent of EP size and placement, for K times the
            combine bytes.
        num_max_dispatch_tokens_per_rank: capacity of low-latency decode (tokens per rank).
        fp8_decode: low-latency dispatch sends FP8 e4m3 with per-128-channel scales (DeepEP's
            default, half the bytes of bf16); experts run on the dequantised tokens. Needs
            ``hidden % 128 == 0``.

    ``forward(x: [T, H]) -> [T, H]``. Routing statistics accumulate in ``tokens_per_expert``
    (``[E] int64``, this rank's tokens) until :meth:`update_routing_bias`.
    """

    def __init__(self, config: MoEConfig, buffer: Buffer, *, placement: Optional[Placement] = None,
                 seed: int = 0, dtype: torch.dtype = torch.float32, slotwise_combine: bool = False,
                 num_max_dispatch_tokens_per_rank: int = 128, fp8_decode: bool = False) -> None:
        super().__init__()
        if not isinstance(buffer, Buffer):
            raise TypeError(f"buffer must be a flexep.Buffer, got {type(buffer).__name__}")
        world, rank = buffer.group_size, buffer.rank
        if placement is None:
            if config.num_experts % world:
                raise ValueError(f"config.num_experts ({config.num_experts}) must be divisible by "
                                 f"the EP group size ({world})")
            placement = Placement.identity(config.num_experts, world)
        if placement.num_logical != config.num_experts or placement.num_ranks != world:
            raise ValueError(f"placement is for {placement.num_logical} experts on "
                             f"{placement.num_ranks} ranks, expected {config.num_experts} experts on "
                             f"{world} ranks")
        self.config, self.buffer, self.placement = config, buffer, placement
        self.slotwise_combine = bool(slotwise_combine)
        self.num_max_dispatch_tokens_per_rank = int(num_max_dispatch_tokens_per_rank)
        if fp8_decode and config.hidden % 128:
            raise ValueError(f"fp8_decode needs hidden divisible by 128 (per-128-channel scales), "
                             f"got hidden={config.hidden}")
        self.fp8_decode = bool(fp8_decode)
        local = placement.experts_per_rank
        self.gate_weight = torch.nn.Parameter(_seeded_normal(
            (config.num_experts, config.hidden), config.hidden ** -0.5, seed, "gate").to(dtype))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))
        self.register_buffer("tokens_per_expert", torch.zeros(config.num_experts, dtype=torch.int64),
                             persistent=False)
        self.experts = GroupedExperts.seeded(placement.physical_to_logical[rank * local:(rank + 1) * local],
                                             config.hidden, config.intermediate, seed, dtype)
        self.shared = (SwiGLU(config.hidden, config.num_shared_experts * config.intermediate, seed, dtype)
                       if config.num_shared_experts else None)
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

    # ---- routing ---------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [T, H]`` -> logical ``topk_idx [T, K] int64``, ``topk_weights [T, K] float32``."""
        c = self.config
        # The gate runs in float32 whatever the model dtype: routing decisions are discrete, and
        # bf16 logits would flip near-ties.
        logits = _rows(lambda x: F.linear(x, self.gate_weight.float()), x.float())
        return deepseek_v3_route(logits, self.e_score_correction_bias, c.topk, c.n_group, c.topk_group,
                                 c.routed_scaling_factor)

    @torch.no_grad()
    def update_routing_bias(self) -> torch.Tensor:
        """Aux-loss-free balancing step (collective over the buffer's group).

        Sums ``tokens_per_expert`` over the group, moves each expert's bias by
        ``bias_update_speed`` towards the mean load (up if under-loaded, down if over-loaded),
        resets the counters and returns the global load ``[E] int64`` (EPLB statistics).
        """
        load = self.tokens_per_expert.clone()
        dist.all_reduce(load, group=self.buffer.group)
        self.e_score_correction_bias += self.config.bias_update_speed * torch.sign(
            load.double().mean() - load.double()).float()
        self.tokens_per_expert.zero_()
        return load

    @torch.no_grad()
    def apply_placement(self, placement: Placement) -> None:
        """Move the expert weights to a new EPLB placement (collective over the buffer's group).

        Every rank must pass the same placement (e.g. :func:`~flexep.eplb.rebalance` of the load
        :meth:`update_routing_bias` returned). Each new slot receives its logical expert from
        the rank holding that expert's first replica now, in one ``all_to_all_single`` of whole
        expert rows. The expert parameters are replaced, so optimizer state does not carry over:
        an inference-time operation (train with one replica per expert).
        """
        world, rank = self.buffer.group_size, self.buffer.rank
        if placement.num_logical != self.config.num_experts or placement.num_ranks != world:
            raise ValueError(f"placement is for {placement.num_logical} experts on "
                             f"{placement.num_ranks} ranks, expected {self.config.num_experts} "
                             f"experts on {world} ranks")
        ex, old_local, new_local = self.experts, self.placement.experts_per_rank, placement.experts_per_rank
        source_slot = self.placement.logical_to_physical[:, 0].tolist()  # [E] global slot
        wanted = placement.physical_to_logical.view(world, new_local).tolist()
        rows = torch.cat([ex.w_gate.flatten(1), ex.w_up.flatten(1), ex.w_down.flatten(1)], 1)
        # Send, per destination in its slot order, the experts whose source slot is here; receive
        # grouped by source rank (all_to_all order), in this rank's slot order inside a group.
        source_rank = [slot // old_local for slot in source_slot]
        send = [[source_slot[e] - rank * old_local for e in wanted[d] if source_rank[e] == rank]
                for d in range(world)]
        mine = sorted(range(new_local), key=lambda j: (source_rank[wanted[rank][j]], j))
        recv_counts = [sum(source_rank[e] == s for e in wanted[rank]) for s in range(world)]
        received = rows.new_empty(new_local, rows.size(1))
        dist.all_to_all_single(received, rows[sum(send, [])].contiguous(), recv_counts,
                               [len(d) for d in send], group=self.buffer.group)
        moved = torch.empty_like(received)
        moved[mine] = received
        h, i = self.config.hidden, self.config.intermediate
        gate, up, down = moved.split([h * i, h * i, i * h], 1)
        self.experts = GroupedExperts(placement.physical_to_logical[rank * new_local:(rank + 1) * new_local],
                                      gate.reshape(new_local, h, i), up.reshape(new_local, h, i),
                                      down.reshape(new_local, i, h))
        self.placement = placement

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
        # (row, slot) pairs this rank serves, grouped by local expert; a stable sort keeps each
        # expert's rows in (source rank, source token) order, the same at every EP size.
        flat = recv_idx.flatten()
        pos = (flat >= 0).nonzero().flatten()
        pos = pos[torch.sort(flat[pos], stable=True).indices]
        rows, slots = pos // k, pos % k
        counts = torch.bincount(flat[pos], minlength=self.placement.experts_per_rank)
        # Weighting and the slot sum run in float32 and round once to x's dtype (as DeepEP's
        # combine accumulates); for float32 models this is plain float32 arithmetic.
        y = self.experts(recv_x[rows], counts).float() * recv_w[rows, slots].unsqueeze(1)
        per_slot = y.new_zeros(m * k, x.size(1)).index_put((pos,), y).view(m, k, x.size(1))
        if self.slotwise_combine:
            # One combine per slot: each sums one non-zero row (the slot's expert lives on one
            # rank) with zeros, which is exact. (Buffer.combine keeps the dispatch's hidden
            # size, so the K slots cannot travel as one [M, K*H] row.)
            outs = [autograd.combine(self.buffer, per_slot[:, j].to(x.dtype).contiguous(), handle)
                    for j in range(k)]
            return _sum_slots(torch.stack(outs, 1).float()).to(x.dtype)
        return autograd.combine(self.buffer, _sum_slots(per_slot).to(x.dtype), handle)

    def _routed_low_latency(self, x: torch.Tensor, topk_idx: torch.Tensor,
                            topk_weights: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.gate_weight.requires_grad):
            raise RuntimeError("the low-latency path is inference only: run it under "
                               "torch.no_grad() / torch.inference_mode(), or pass low_latency=False")
        if not self.buffer.low_latency_mode:
            raise ValueError("low_latency=True needs a Buffer built with low_latency_mode=True")
        recv_x, _count, handle, _event, _hook = self.buffer.low_latency_dispatch(
            x, topk_idx, self.num_max_dispatch_tokens_per_rank, self.placement.num_physical,
            use_fp8=self.fp8_decode)
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
