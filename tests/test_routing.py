"""Routing rules against each model's own routing code, bit for bit, near-ties included.

Every reference below is restated from the model's public source, step by step with the model's
tensor shapes, dtypes and operations (that is what makes bitwise parity meaningful: the same
kernels on the same tensors), and shares no code with :mod:`flexep.moe.routing`:

* DeepSeek-V3 ``Gate.forward`` (github.com/deepseek-ai/DeepSeek-V3, ``inference/model.py``),
  also with ``score_func="softmax"``, the path DeepSeek's own code runs for DeepSeek-V2;
* DeepSeek-V2 ``MoEGate.forward`` (Hugging Face ``deepseek-ai/DeepSeek-V2``,
  ``modeling_deepseek.py``);
* ``Qwen2MoeSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock``, ``MixtralSparseMoeBlock`` router steps
  and ``GptOssTopKRouter.forward`` (Hugging Face ``transformers``).

Inputs: random logits, near-tie logits (a handful of distinct values, so most scores tie), both
in float32 (what DeepSeek's Hugging Face gates compute) and bfloat16 (the gate of a bf16 model in
DeepSeek's own inference code, Qwen, Mixtral and gpt-oss). Token counts are not multiples of the
vector width, so kernels' scalar tails are exercised.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import flexep
from flexep.moe import PRESETS, MoEConfig, MoELayer, deepseek_v3_route, route

TOKENS = 77


# ---- the references, restated -------------------------------------------------------------------
def deepseek_gate(logits, bias, topk, n_groups, topk_groups, score_func, route_scale):
    """DeepSeek-V3 ``Gate.forward`` after its ``linear``: returns (weights, indices)."""
    if score_func == "softmax":
        s = logits.softmax(dim=-1, dtype=torch.float32)
    else:
        s = logits.sigmoid()
    unbiased = s
    if bias is not None:
        s = s + bias
    if n_groups > 1:
        s = s.view(logits.size(0), n_groups, -1)
        per_group = s.amax(dim=-1) if bias is None else s.topk(2, dim=-1)[0].sum(dim=-1)
        chosen_groups = per_group.topk(topk_groups, dim=-1)[1]
        drop = s.new_ones(logits.size(0), n_groups, dtype=torch.bool).scatter_(1, chosen_groups, False)
        s = s.masked_fill_(drop.unsqueeze(-1), float("-inf")).flatten(1)
    indices = torch.topk(s, topk, dim=-1)[1]
    weights = unbiased.gather(1, indices)
    if score_func == "sigmoid":
        weights /= weights.sum(dim=-1, keepdim=True)
    weights *= route_scale
    return weights.type_as(logits), indices


def deepseek_v2_moegate(logits, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
                        topk_method):
    """DeepSeek-V2 ``MoEGate.forward`` from its float32 logits (batch of one sequence)."""
    bsz, seq_len = 1, logits.size(0)
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    if topk_method == "greedy":
        topk_weight, topk_idx = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    else:  # group_limited_greedy
        group_scores = scores.view(bsz * seq_len, n_group, -1).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(bsz * seq_len, n_group, logits.size(1) // n_group) \
            .reshape(bsz * seq_len, -1)
        tmp_scores = scores.masked_fill(~score_mask.bool(), 0.0)
        topk_weight, topk_idx = torch.topk(tmp_scores, k=top_k, dim=-1, sorted=False)
    if top_k > 1 and norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        topk_weight = topk_weight * routed_scaling_factor
    return topk_idx, topk_weight


def qwen_moe_block_router(router_logits, top_k, norm_topk_prob):
    """Qwen2-MoE / Qwen3-MoE sparse block: the routing lines of ``forward``."""
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    if norm_topk_prob:
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    return selected_experts, routing_weights.to(router_logits.dtype)


def mixtral_block_router(router_logits, top_k):
    """Mixtral sparse block: softmax, top-k, always renormalised, cast back."""
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    return selected_experts, routing_weights.to(router_logits.dtype)


def gpt_oss_router(router_logits, top_k):
    """gpt-oss ``GptOssTopKRouter.forward`` after its linear: (router_scores [T, E], indices)."""
    router_top_value, router_indices = torch.topk(router_logits, top_k, dim=-1)
    router_top_value = F.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)
    router_scores = torch.zeros_like(router_logits).scatter_(1, router_indices, router_top_value)
    return router_scores, router_indices


# ---- inputs ---------------------------------------------------------------------------------------
def logits_for(num_experts: int, kind: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[TOKENS, E] router logits: ``random`` from a gate matmul; ``ties`` from four values, with
    whole rows equal; in ``dtype`` (a bf16 gate computes in bf16)."""
    gen = torch.Generator().manual_seed(seed * 1000 + num_experts)
    if kind == "random":
        x = torch.randn(TOKENS, 64, generator=gen)
        w = torch.randn(num_experts, 64, generator=gen) * 64 ** -0.5
        return F.linear(x.to(dtype), w.to(dtype))
    values = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    logits = values[torch.randint(0, 4, (TOKENS, num_experts), generator=gen)]
    logits[:3] = 0.5  # every score equal
    return logits.to(dtype)


def correction_bias(num_experts: int, kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(num_experts)
    if kind == "ties":
        return torch.tensor([0.0, 0.25])[torch.randint(0, 2, (num_experts,), generator=gen)]
    return torch.randn(num_experts, generator=gen) * 0.1


KINDS = ("random", "ties")
DTYPES = (torch.float32, torch.bfloat16)


def assert_same(got_idx, got_w, ref_idx, ref_w):
    assert got_idx.dtype == torch.int64 and got_w.dtype == ref_w.dtype, (got_w.dtype, ref_w.dtype)
    assert torch.equal(got_idx, ref_idx)
    assert torch.equal(got_w, ref_w)


# ---- parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts,topk,groups,limit,scale",
                         [(256, 8, 8, 4, 2.5), (64, 6, 8, 3, 1.0), (16, 4, 1, 1, 1.0)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_deepseek_v3_matches_deepseeks_gate(kind, dtype, experts, topk, groups, limit, scale, with_bias):
    logits = logits_for(experts, kind, dtype)
    bias = correction_bias(experts, kind) if with_bias else None
    ref_w, ref_idx = deepseek_gate(logits.clone(), bias, topk, groups, limit, "sigmoid", scale)
    idx, w = route(logits, "deepseek_v3", topk, bias=bias, n_group=groups, topk_group=limit,
                   routed_scaling_factor=scale)
    assert_same(idx, w, ref_idx, ref_w)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", ["deepseek-v2", "deepseek-v2-lite"])
def test_deepseek_v2_matches_moegate(kind, dtype, preset):
    c = PRESETS[preset]
    logits = logits_for(c.num_experts, kind, dtype)
    method = "greedy" if c.n_group == 1 else "group_limited_greedy"
    for norm in (False, True):
        ref_idx, ref_w = deepseek_v2_moegate(logits, c.topk, c.n_group, c.topk_group, norm,
                                             c.routed_scaling_factor, method)
        idx, w = route(logits, "deepseek_v2", c.topk, n_group=c.n_group, topk_group=c.topk_group,
                       renormalize=norm, routed_scaling_factor=c.routed_scaling_factor)
        assert_same(idx, w, ref_idx, ref_w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", ["deepseek-v2", "deepseek-v2-lite"])
def test_deepseek_v2_agrees_with_deepseeks_own_gate(dtype, preset):
    # DeepSeek's inference Gate runs DeepSeek-V2 with score_func="softmax": sorted top-k and
    # -inf masking instead of MoEGate's unsorted top-k and 0.0 masking. On inputs without ties
    # the experts chosen and their weights agree; only their order differs.
    c = PRESETS[preset]
    logits = logits_for(c.num_experts, "random", dtype).float()
    ref_w, ref_idx = deepseek_gate(logits.clone(), None, c.topk, c.n_group, c.topk_group, "softmax",
                                   c.routed_scaling_factor)
    idx, w = route(logits, "deepseek_v2", c.topk, n_group=c.n_group, topk_group=c.topk_group,
                   routed_scaling_factor=c.routed_scaling_factor)
    order, ref_order = idx.sort(1), ref_idx.sort(1)
    assert torch.equal(order.values, ref_order.values)
    assert torch.equal(w.gather(1, order.indices), ref_w.gather(1, ref_order.indices))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", ["qwen2-57b-a14b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b",
                                    "qwen3-235b-a22b"])
def test_qwen_moe_matches_its_sparse_block(kind, dtype, preset):
    c = PRESETS[preset]
    logits = logits_for(c.num_experts, kind, dtype)
    ref_idx, ref_w = qwen_moe_block_router(logits, c.topk, c.renormalize)
    idx, w = route(logits, "softmax_topk", c.topk, renormalize=c.renormalize)
    assert_same(idx, w, ref_idx, ref_w)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", ["mixtral-8x7b", "mixtral-8x22b"])
def test_mixtral_matches_its_sparse_block(kind, dtype, preset):
    c = PRESETS[preset]
    logits = logits_for(c.num_experts, kind, dtype)
    ref_idx, ref_w = mixtral_block_router(logits, c.topk)
    idx, w = route(logits, "softmax_topk", c.topk, renormalize=True)
    assert_same(idx, w, ref_idx, ref_w)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", ["gpt-oss-20b", "gpt-oss-120b"])
def test_gpt_oss_matches_its_router(kind, dtype, preset):
    c = PRESETS[preset]
    logits = logits_for(c.num_experts, kind, dtype)
    ref_scores, ref_idx = gpt_oss_router(logits, c.topk)
    idx, w = route(logits, "topk_softmax", c.topk)
    assert_same(idx, w, ref_idx, ref_scores.gather(1, ref_idx))
    assert torch.equal(torch.zeros_like(logits).scatter_(1, idx, w), ref_scores)


def test_near_tie_inputs_tie_at_the_cut():
    # The near-tie inputs must make top-k choose among equal scores (else they test nothing):
    # for most tokens the k-th and (k+1)-th largest logits are equal.
    for experts, k in ((256, 8), (60, 4), (8, 2)):
        top = logits_for(experts, "ties", torch.float32).topk(k + 1, dim=-1).values
        assert (top[:, k - 1] == top[:, k]).float().mean() > 0.5, experts


# ---- behaviour ------------------------------------------------------------------------------------
def test_deepseek_v3_group_score_depends_on_the_bias():
    # Without a bias a group scores its best expert, with one the sum of its two best: the rules
    # pick different groups for many tokens (why "always sum the top two" was wrong).
    logits = logits_for(256, "random", torch.float32)
    no_bias, _ = route(logits, "deepseek_v3", 8, n_group=8, topk_group=4)
    zero_bias, _ = route(logits, "deepseek_v3", 8, bias=torch.zeros(256), n_group=8, topk_group=4)
    differ = int((no_bias.sort(1).values != zero_bias.sort(1).values).any(1).sum())
    assert differ > TOKENS // 4, differ


def test_weights_are_differentiable_and_the_bias_is_not():
    bias = torch.zeros(8, requires_grad=True)
    for rule, kw in (("deepseek_v3", dict(bias=bias, n_group=2, topk_group=1)),
                     ("deepseek_v2", dict(n_group=2, topk_group=1)), ("softmax_topk", {}),
                     ("topk_softmax", {})):
        logits = torch.randn(5, 8, requires_grad=True)
        _, w = route(logits, rule, 2, **kw)
        (w * torch.randn_like(w)).sum().backward()
        assert logits.grad is not None and logits.grad.abs().sum() > 0, rule
        if "bias" in kw:
            assert kw["bias"].grad is None


def test_zero_tokens_route_to_empty_results():
    for rule, kw in (("deepseek_v3", dict(bias=torch.zeros(8), n_group=4, topk_group=2)),
                     ("deepseek_v2", dict(n_group=4, topk_group=2)), ("softmax_topk", {}),
                     ("topk_softmax", {})):
        idx, w = route(torch.zeros(0, 8), rule, 2, **kw)
        assert idx.shape == (0, 2) and w.shape == (0, 2)


def test_softmax_topk_example_from_the_docstring():
    idx, w = route(torch.tensor([[0.0, 1.0986123, 0.6931472]]), "softmax_topk", 2, renormalize=True)
    assert idx.tolist() == [[1, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.4]]))


def test_deepseek_v3_route_wrapper_is_the_float32_rule():
    logits = logits_for(16, "random", torch.bfloat16)
    bias = correction_bias(16, "random")
    a = deepseek_v3_route(logits, bias, 4, 4, 2, 2.5)
    b = route(logits.float(), "deepseek_v3", 4, bias=bias, n_group=4, topk_group=2,
              routed_scaling_factor=2.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[1].dtype == torch.float32


Z = torch.zeros(2, 8)
ROUTE_ERRORS = [
    (lambda: route(Z, "switch", 2),
     r"rule must be one of deepseek_v3, deepseek_v2, softmax_topk, topk_softmax; got 'switch'"),
    (lambda: route(torch.zeros(8), "softmax_topk", 2),
     r"logits must be a floating \[T, E\] tensor, got shape \(8,\)"),
    (lambda: route(Z.long(), "softmax_topk", 2), r"logits must be a floating"),
    (lambda: route(Z, "softmax_topk", 0), r"topk must be a positive int, got 0"),
    (lambda: route(torch.zeros(2, 10), "deepseek_v3", 2, n_group=4),
     r"number of experts \(10\) must be divisible by n_group \(4\)"),
    (lambda: route(Z, "deepseek_v3", 2, n_group=2, topk_group=3),
     r"topk_group \(3\) must be <= n_group \(2\)"),
    (lambda: route(Z, "deepseek_v3", 5, n_group=4, topk_group=2),
     r"topk \(5\) must be <= the experts of topk_group"),
    (lambda: route(Z, "softmax_topk", 2, n_group=2), r"rule 'softmax_topk' has no expert groups"),
    (lambda: route(Z, "deepseek_v2", 2, bias=torch.zeros(8)), r"bias .* 'deepseek_v3' only"),
    (lambda: route(Z, "deepseek_v3", 2, bias=torch.zeros(7)), r"bias must be a \[8\] tensor, got \(7,\)"),
    (lambda: route(Z, "topk_softmax", 2, renormalize=True), r"takes no renormalize"),
    (lambda: route(Z, "softmax_topk", 2, routed_scaling_factor=2.0), r"has no scaling factor"),
]


@pytest.mark.parametrize("call,message", ROUTE_ERRORS)
def test_route_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- configs, presets and the layer ---------------------------------------------------------------
def test_presets_route_as_their_models():
    expected = {  # rule, experts, top-k, groups, group limit, renormalised
        "deepseek-v3": ("deepseek_v3", 256, 8, 8, 4, True),
        "deepseek-v2": ("deepseek_v2", 160, 6, 8, 3, False),
        "deepseek-v2-lite": ("deepseek_v2", 64, 6, 1, 1, False),
        "qwen2-57b-a14b": ("softmax_topk", 64, 8, 1, 1, False),
        "qwen1.5-moe-a2.7b": ("softmax_topk", 60, 4, 1, 1, False),
        "qwen3-30b-a3b": ("softmax_topk", 128, 8, 1, 1, True),
        "qwen3-235b-a22b": ("softmax_topk", 128, 8, 1, 1, True),
        "mixtral-8x7b": ("softmax_topk", 8, 2, 1, 1, True),
        "mixtral-8x22b": ("softmax_topk", 8, 2, 1, 1, True),
        "gpt-oss-20b": ("topk_softmax", 32, 4, 1, 1, False),
        "gpt-oss-120b": ("topk_softmax", 128, 4, 1, 1, False),
    }
    assert set(PRESETS) == set(expected)
    for name, (rule, experts, topk, groups, limit, norm) in expected.items():
        c = MoEConfig.preset(name)
        assert (c.routing, c.num_experts, c.topk, c.n_group, c.topk_group, c.renormalizes) == \
            (rule, experts, topk, groups, limit, norm), name
    assert MoEConfig.preset("deepseek-v3").has_correction_bias
    assert not MoEConfig.preset("deepseek-v2").has_correction_bias
    assert MoEConfig.preset("gpt-oss-120b").router_bias
    assert MoEConfig.preset("qwen2-57b-a14b").shared_expert_gate
    assert MoEConfig.preset("qwen3-30b-a3b", hidden=32).hidden == 32
    with pytest.raises(ValueError, match=r"unknown preset 'llama'; presets: deepseek-v2, "):
        MoEConfig.preset("llama")
    with pytest.raises(TypeError, match=r"MoEConfig has no field\(s\) \['hiden'\]"):
        MoEConfig.preset("mixtral-8x7b", hiden=32)


@pytest.mark.parametrize("kwargs,message", [
    (dict(routing="switch"), r"MoEConfig.routing must be one of"),
    (dict(routing="softmax_topk", n_group=2, topk_group=1), r"routing='softmax_topk' has no expert groups"),
    (dict(routing="topk_softmax", routed_scaling_factor=2.0), r"has no scaling factor"),
    (dict(routing="deepseek_v2", correction_bias=True), r"correction_bias=True needs routing='deepseek_v3'"),
    (dict(routing="topk_softmax", renormalize=True), r"takes no renormalize"),
    (dict(router_dtype=torch.int32), r"router_dtype must be float32, bfloat16 or float16"),
    (dict(shared_expert_gate=True), r"shared_expert_gate=True needs num_shared_experts >= 1"),
])
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(hidden=8, intermediate=8, num_experts=8, topk=2, **kwargs)


LAYER_PRESETS = ["deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "qwen2-57b-a14b", "qwen3-30b-a3b",
                 "mixtral-8x7b", "gpt-oss-20b"]


def _reference_route(config: MoEConfig, layer: MoELayer, x: torch.Tensor):
    """The model's router on the layer's gate, in the router dtype: (idx, weights)."""
    dt = config.router_dtype
    bias = layer.gate_bias.to(dt) if layer.gate_bias is not None else None
    logits = F.linear(x.to(dt), layer.gate_weight.to(dt), bias)
    if config.routing == "deepseek_v3":
        w, idx = deepseek_gate(logits.clone(), layer.e_score_correction_bias, config.topk, config.n_group,
                               config.topk_group, "sigmoid", config.routed_scaling_factor)
        return idx, w
    if config.routing == "deepseek_v2":
        method = "greedy" if config.n_group == 1 else "group_limited_greedy"
        return deepseek_v2_moegate(logits, config.topk, config.n_group, config.topk_group,
                                   config.renormalizes, config.routed_scaling_factor, method)
    if config.routing == "topk_softmax":
        scores, idx = gpt_oss_router(logits, config.topk)
        return idx, scores.gather(1, idx)
    return qwen_moe_block_router(logits, config.topk, config.renormalizes)


@pytest.mark.parametrize("router_dtype", DTYPES)
@pytest.mark.parametrize("preset", LAYER_PRESETS)
def test_layer_routes_with_its_preset(gloo_world1, preset, router_dtype):
    config = MoEConfig.preset(preset, hidden=32, intermediate=16, num_shared_experts=0,
                              shared_expert_gate=False, router_dtype=router_dtype)
    layer = MoELayer(config, flexep.Buffer(dist.group.WORLD), seed=3)
    if layer.e_score_correction_bias is not None:
        layer.e_score_correction_bias.copy_(correction_bias(config.num_experts, "random"))
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))  # T * E: whole vector blocks
    idx, w = layer.route(x)
    ref_idx, ref_w = _reference_route(config, layer, x)
    assert torch.equal(idx, ref_idx) and w.dtype == torch.float32
    assert torch.equal(w, ref_w.float())


def test_layer_with_qwen2_shared_gate_and_gpt_oss_router_bias(gloo_world1):
    buf = flexep.Buffer(dist.group.WORLD)
    qwen = MoELayer(MoEConfig.preset("qwen2-57b-a14b", hidden=16, intermediate=8), buf, seed=2)
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(0))
    shared = qwen.shared
    dense = (F.silu(x @ shared.w_gate) * (x @ shared.w_up)) @ shared.w_down
    torch.testing.assert_close(shared(x), torch.sigmoid(x @ shared.w_shared_gate) * dense)
    assert shared.w_shared_gate.shape == (16, 1) and shared.w_gate.shape == (16, 8 * 8)
    oss = MoELayer(MoEConfig.preset("gpt-oss-20b", hidden=16, intermediate=8), buf, seed=2)
    assert oss.gate_bias is not None and oss.gate_bias.shape == (32,) and oss.e_score_correction_bias is None
    with torch.no_grad():
        y = oss(x)
    assert y.shape == (9, 16) and bool(torch.isfinite(y).all())
