"""Routing rules of the MoE models people serve, each as its model's own code computes it.

:func:`route` turns router logits into ``topk_idx`` and ``topk_weights`` by one of four rules.
Each rule performs its reference implementation's tensor operations in the same order and
dtypes, so for the same logits it returns the same bits, near-ties included (``tests/
test_routing.py`` restates every reference independently and compares bit for bit):

==================  ==============================================================================
rule                reference and arithmetic
==================  ==============================================================================
``deepseek_v3``     DeepSeek-V3 ``Gate`` (``inference/model.py``, ``score_func="sigmoid"``):
                    ``s = sigmoid(logits)``; selection on ``s + bias`` when there is a correction
                    bias; group-limited: a group scores the sum of its two best biased scores
                    *with* a bias and its best score *without* one (as DeepSeek's code does),
                    the ``topk_group`` best groups stay, the others are masked to ``-inf``;
                    top-k (sorted); weights = unbiased ``s`` of the chosen experts, divided by
                    their sum (``renormalize``), times ``routed_scaling_factor``.
``deepseek_v2``     DeepSeek-V2 ``MoEGate`` (``modeling_deepseek.py``): ``softmax`` in float32;
                    ``greedy`` top-k (``n_group == 1``, DeepSeek-V2-Lite) or
                    ``group_limited_greedy`` (a group scores its best expert, other groups are
                    masked to 0.0); top-k with ``sorted=False`` (the order is the kernel's, as
                    in the model); weights ``/ (sum + 1e-20)`` when ``renormalize`` and
                    ``topk > 1``, else ``* routed_scaling_factor``.
``softmax_topk``    Qwen2-MoE, Qwen3-MoE, Mixtral (HF ``transformers``): ``softmax`` in float32,
                    top-k (sorted), weights divided by their sum when ``renormalize`` (Qwen3,
                    Mixtral; Qwen2-MoE's default is off), cast to the logits' dtype.
``topk_softmax``    gpt-oss (HF ``GptOssTopKRouter``): top-k of the logits (sorted), then
                    ``softmax`` over the k values in the logits' dtype.
==================  ==============================================================================

Dtypes follow the references: with float32 logits everything is float32; with bfloat16 logits
DeepSeek-V3's scores and weights are bfloat16 (the bias, float32, promotes the selection scores),
softmax rules compute in float32 and return weights cast to bfloat16 (``deepseek_v2`` returns
float32, as its gate does), and gpt-oss's softmax runs in bfloat16.

Shape legend: T tokens, E experts, K = ``topk``, G = ``n_group``.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["RULES", "route", "default_renormalize"]

RULES = ("deepseek_v3", "deepseek_v2", "softmax_topk", "topk_softmax")
_GROUPED = ("deepseek_v3", "deepseek_v2")
_RENORMALIZE = {"deepseek_v3": True, "deepseek_v2": False, "softmax_topk": False, "topk_softmax": False}


def default_renormalize(rule: str) -> bool:
    """Whether ``rule`` divides the chosen weights by their sum when ``renormalize`` is None:
    DeepSeek-V3 yes; DeepSeek-V2 and Qwen2-MoE no (their configs' default); gpt-oss's weights
    sum to one already."""
    _check_rule(rule)
    return _RENORMALIZE[rule]


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")


def _check(logits: torch.Tensor, rule: str, topk: int, bias: Optional[torch.Tensor], n_group: int,
           topk_group: int, renormalize: Optional[bool], routed_scaling_factor: float) -> None:
    _check_rule(rule)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"shape {tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor) \
            else type(logits).__name__
        raise ValueError(f"logits must be a floating [T, E] tensor, got {got}")
    num_experts = logits.size(1)
    for name, value in (("topk", topk), ("n_group", n_group), ("topk_group", topk_group)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_experts % n_group:
        raise ValueError(f"the number of experts ({num_experts}) must be divisible by n_group ({n_group})")
    if topk_group > n_group:
        raise ValueError(f"topk_group ({topk_group}) must be <= n_group ({n_group})")
    reachable = topk_group * (num_experts // n_group)
    if topk > reachable:
        raise ValueError(f"topk ({topk}) must be <= the experts of topk_group groups "
                         f"({topk_group} x {num_experts // n_group} = {reachable})")
    if rule not in _GROUPED and (n_group, topk_group) != (1, 1):
        raise ValueError(f"rule {rule!r} has no expert groups; got n_group={n_group}, "
                         f"topk_group={topk_group} (use 1, 1)")
    if bias is not None:
        if rule != "deepseek_v3":
            raise ValueError(f"bias (a score correction bias) is used by rule 'deepseek_v3' only, "
                             f"not {rule!r}")
        if not isinstance(bias, torch.Tensor) or bias.shape != (num_experts,):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a [{num_experts}] tensor, got {got}")
    if rule == "topk_softmax" and renormalize:
        raise ValueError("rule 'topk_softmax' takes no renormalize: its softmax over the k chosen "
                         "logits sums to one already")
    if rule in ("softmax_topk", "topk_softmax") and routed_scaling_factor != 1.0:
        raise ValueError(f"rule {rule!r} has no scaling factor (Qwen, Mixtral and gpt-oss do not "
                         f"scale); got routed_scaling_factor={routed_scaling_factor}")


def route(logits: torch.Tensor, rule: str, topk: int, *, bias: Optional[torch.Tensor] = None,
          n_group: int = 1, topk_group: int = 1, renormalize: Optional[bool] = None,
          routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Route ``logits: [T, E]`` (the gate's ``x @ W.T``, plus its bias if the router has one).

    Args:
        rule: one of :data:`RULES` (see the module docstring for each model's arithmetic).
        topk: K experts per token.
        bias: ``[E]`` score correction bias (``deepseek_v3`` only; selection only, never in the
            weights, no gradient). None: DeepSeek-V3 without a bias (groups score their best).
        n_group, topk_group: group-limited routing (DeepSeek rules): E splits into ``n_group``
            contiguous groups, a token uses experts of its ``topk_group`` best groups.
        renormalize: divide the chosen weights by their sum; None takes the rule's default
            (:func:`default_renormalize`).
        routed_scaling_factor: multiplies the weights (DeepSeek rules; 1.0 elsewhere).

    Returns:
        ``topk_idx: [T, K] int64`` and ``topk_weights: [T, K]`` in the dtype the model's gate
        returns (see the module docstring), differentiable with respect to ``logits``.

    Example (``softmax_topk``, K = 2, renormalize): logits ``[[0, ln 3, ln 2]]`` -> probabilities
    ``[1/6, 1/2, 1/3]`` -> ``topk_idx [[1, 2]]``, ``topk_weights [[0.6, 0.4]]``.
    """
    _check(logits, rule, topk, bias, n_group, topk_group, renormalize, routed_scaling_factor)
    norm = default_renormalize(rule) if renormalize is None else bool(renormalize)
    if rule == "deepseek_v3":
        return _deepseek_v3(logits, topk, bias, n_group, topk_group, norm, routed_scaling_factor)
    if rule == "deepseek_v2":
        return _deepseek_v2(logits, topk, n_group, topk_group, norm, routed_scaling_factor)
    if rule == "softmax_topk":
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, idx = torch.topk(probs, topk, dim=-1)
        if norm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return idx, weights.to(logits.dtype)
    values, idx = torch.topk(logits, topk, dim=-1)
    return idx, torch.softmax(values, dim=1, dtype=values.dtype)


def _deepseek_v3(logits: torch.Tensor, topk: int, bias: Optional[torch.Tensor], n_group: int,
                 topk_group: int, norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = logits.shape
    scores = torch.sigmoid(logits)  # in the logits' dtype, as the model
    choice = scores.detach()
    if bias is not None:
        choice = choice + bias.detach()
    if n_group > 1:
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)  # (no -1: T may be 0)
        if bias is None:
            group_scores = grouped.amax(dim=-1)
        else:  # groups of one expert (DeepSeek's code needs two) score that expert
            group_scores = grouped.topk(min(2, grouped.size(-1)), dim=-1)[0].sum(dim=-1)
        keep = group_scores.topk(topk_group, dim=-1)[1]
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
    idx = torch.topk(choice, topk, dim=-1)[1]
    weights = scores.gather(1, idx)
    if norm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return idx, weights * scale


def _deepseek_v2(logits: torch.Tensor, topk: int, n_group: int, topk_group: int, norm: bool,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = logits.shape
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    if n_group > 1:
        size = num_experts // n_group  # (no -1 in views: T may be 0)
        group_scores = scores.view(num_tokens, n_group, size).max(dim=-1).values
        keep = torch.topk(group_scores, topk_group, dim=-1, sorted=False)[1]
        kept = torch.zeros_like(group_scores).scatter_(1, keep, 1)
        mask = kept.unsqueeze(-1).expand(num_tokens, n_group, size).reshape(num_tokens, num_experts)
        scores = scores.masked_fill(~mask.bool(), 0.0)
    weights, idx = torch.topk(scores, topk, dim=-1, sorted=False)
    if topk > 1 and norm:
        return idx, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, weights * scale
