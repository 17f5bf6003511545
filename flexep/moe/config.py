"""The MoE layer's configuration, and presets for the models people serve.

:meth:`MoEConfig.preset` gives a model's MoE block sizes and its router, exactly (routing rule,
groups, scaling, renormalisation, router bias, shared-expert gate; values from each model's
published config). Experts are flexep's SwiGLU experts in every preset: gpt-oss's clamped
SwiGLU with biases is not modelled, so a gpt-oss preset routes as gpt-oss does but its experts
are SwiGLU.

==================  =========================================================================
preset              router
==================  =========================================================================
deepseek-v3         256 experts, top-8, 8 groups / 4, sigmoid + correction bias, scale 2.5
deepseek-v2         160 experts, top-6, 8 groups / 3, softmax, no renormalisation, scale 16
deepseek-v2-lite    64 experts, top-6, softmax greedy
qwen2-57b-a14b      Qwen2-MoE: 64 experts, top-8, softmax, no renormalisation, gated shared expert
qwen1.5-moe-a2.7b   Qwen2-MoE architecture: 60 experts, top-4, gated shared expert
qwen3-30b-a3b       Qwen3-MoE: 128 experts, top-8, softmax, renormalised
qwen3-235b-a22b     Qwen3-MoE: 128 experts, top-8, softmax, renormalised
mixtral-8x7b        8 experts, top-2, softmax, renormalised
mixtral-8x22b       8 experts, top-2, softmax, renormalised
gpt-oss-20b         32 experts, top-4, top-k then softmax, router bias
gpt-oss-120b        128 experts, top-4, top-k then softmax, router bias
==================  =========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from .routing import RULES, default_renormalize

__all__ = ["MoEConfig", "PRESETS"]


@dataclass(frozen=True)
class MoEConfig:
    """Sizes and routing of one MoE layer (DeepSeek-V3 / Hugging Face names in brackets).

    Attributes:
        hidden: H [hidden_size].
        intermediate: I of each routed expert [moe_intermediate_size].
        num_experts: E logical routed experts [n_routed_experts, num_experts, num_local_experts].
        topk: K experts per token [num_experts_per_tok].
        n_group: G expert groups for group-limited routing [n_group]; 1 disables it.
        topk_group: groups a token may use [topk_group].
        routed_scaling_factor: multiplies the routing weights (DeepSeek rules).
        num_shared_experts: shared experts, run on every token as one SwiGLU of width
            ``num_shared_experts * intermediate`` [n_shared_experts]; 0 for none.
        bias_update_speed: step of the aux-loss-free bias update (``gamma`` in the paper).
        routing: the routing rule, one of :data:`flexep.moe.routing.RULES`.
        renormalize: divide the chosen weights by their sum [norm_topk_prob]; None takes the
            rule's default (:func:`~flexep.moe.routing.default_renormalize`).
        correction_bias: the layer keeps DeepSeek-V3's ``e_score_correction_bias`` (selection
            only, updated by :meth:`~flexep.moe.MoELayer.update_routing_bias`). None: on for
            ``deepseek_v3``, off otherwise; only ``deepseek_v3`` accepts True. Without it,
            DeepSeek-V3 groups score their best expert, as DeepSeek's ``Gate`` does.
        router_bias: the gate linear has a bias (gpt-oss).
        router_dtype: dtype of the gate matmul and the routing arithmetic: float32 (default;
            DeepSeek's Hugging Face gates upcast) or the model's dtype, e.g. bfloat16, as
            DeepSeek-V3's own inference code, Qwen, Mixtral and gpt-oss compute it in a bf16
            model.
        shared_expert_gate: the shared expert's output is scaled by ``sigmoid(x @ w)`` per token
            (Qwen2-MoE's ``shared_expert_gate``).
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
    routing: str = "deepseek_v3"
    renormalize: Optional[bool] = None
    correction_bias: Optional[bool] = None
    router_bias: bool = False
    router_dtype: torch.dtype = torch.float32
    shared_expert_gate: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "num_experts", "topk", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
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
        self._check_routing()

    def _check_routing(self) -> None:
        if self.routing not in RULES:
            raise ValueError(f"MoEConfig.routing must be one of {', '.join(RULES)}; got {self.routing!r}")
        grouped = self.routing in ("deepseek_v3", "deepseek_v2")
        if not grouped and (self.n_group, self.topk_group) != (1, 1):
            raise ValueError(f"MoEConfig.routing={self.routing!r} has no expert groups; got "
                             f"n_group={self.n_group}, topk_group={self.topk_group} (use 1, 1)")
        if not grouped and self.routed_scaling_factor != 1.0:
            raise ValueError(f"MoEConfig.routing={self.routing!r} has no scaling factor; got "
                             f"routed_scaling_factor={self.routed_scaling_factor}")
        if self.correction_bias and self.routing != "deepseek_v3":
            raise ValueError(f"MoEConfig.correction_bias=True needs routing='deepseek_v3', got "
                             f"{self.routing!r}")
        if self.routing == "topk_softmax" and self.renormalize:
            raise ValueError("MoEConfig.routing='topk_softmax' takes no renormalize (its weights sum "
                             "to one)")
        if self.router_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"MoEConfig.router_dtype must be float32, bfloat16 or float16, got "
                             f"{self.router_dtype}")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("MoEConfig.shared_expert_gate=True needs num_shared_experts >= 1")

    @property
    def has_correction_bias(self) -> bool:
        """Whether the layer keeps a score correction bias (``correction_bias`` resolved)."""
        return self.routing == "deepseek_v3" if self.correction_bias is None else self.correction_bias

    @property
    def renormalizes(self) -> bool:
        """``renormalize`` resolved against the rule's default."""
        return default_renormalize(self.routing) if self.renormalize is None else self.renormalize

    @classmethod
    def preset(cls, name: str, **overrides) -> MoEConfig:
        """The MoE block of a named model (:data:`PRESETS`), with fields replaced by ``overrides``.

        Example: ``MoEConfig.preset("qwen3-30b-a3b", hidden=64, intermediate=32)`` routes like
        Qwen3-30B-A3B (128 experts, top-8, renormalised softmax) at a test size.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"MoEConfig has no field(s) {unknown}; fields: {sorted(known)}")
        return replace(PRESETS[name], **overrides)


def _deepseek(hidden, intermediate, experts, topk, groups, limit, scale, shared, routing, **kw):
    return MoEConfig(hidden=hidden, intermediate=intermediate, num_experts=experts, topk=topk,
                     n_group=groups, topk_group=limit, routed_scaling_factor=scale,
                     num_shared_experts=shared, routing=routing, **kw)


PRESETS = {
    "deepseek-v3": _deepseek(7168, 2048, 256, 8, 8, 4, 2.5, 1, "deepseek_v3"),
    "deepseek-v2": _deepseek(5120, 1536, 160, 6, 8, 3, 16.0, 2, "deepseek_v2"),
    "deepseek-v2-lite": _deepseek(2048, 1408, 64, 6, 1, 1, 1.0, 2, "deepseek_v2"),
    "qwen2-57b-a14b": MoEConfig(hidden=3584, intermediate=2560, num_experts=64, topk=8,
                                num_shared_experts=8, shared_expert_gate=True, routing="softmax_topk",
                                renormalize=False),
    "qwen1.5-moe-a2.7b": MoEConfig(hidden=2048, intermediate=1408, num_experts=60, topk=4,
                                   num_shared_experts=4, shared_expert_gate=True,
                                   routing="softmax_topk", renormalize=False),
    "qwen3-30b-a3b": MoEConfig(hidden=2048, intermediate=768, num_experts=128, topk=8,
                               routing="softmax_topk", renormalize=True),
    "qwen3-235b-a22b": MoEConfig(hidden=4096, intermediate=1536, num_experts=128, topk=8,
                                 routing="softmax_topk", renormalize=True),
    "mixtral-8x7b": MoEConfig(hidden=4096, intermediate=14336, num_experts=8, topk=2,
                              routing="softmax_topk", renormalize=True),
    "mixtral-8x22b": MoEConfig(hidden=6144, intermediate=16384, num_experts=8, topk=2,
                               routing="softmax_topk", renormalize=True),
    "gpt-oss-20b": MoEConfig(hidden=2880, intermediate=2880, num_experts=32, topk=4,
                             routing="topk_softmax", router_bias=True),
    "gpt-oss-120b": MoEConfig(hidden=2880, intermediate=2880, num_experts=128, topk=4,
                              routing="topk_softmax", router_bias=True),
}
