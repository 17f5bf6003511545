"""Megatron-Core 0.19.2 ``MoEAlltoAllTokenDispatcher``, driven as Megatron's ``MoELayer`` drives it
(``megatron/core/transformer/moe/moe_layer.py``: route -> preprocess -> dispatch ->
routed_experts_compute -> combine -> postprocess), on ``hidden_states [S, B, H] = [T, 1, H]``.

One pass on this rank:

    dispatch  the router's top-k output format (``moe_utils.topk_routing_with_score_function``):
              dense probs [T, E] and a bool routing map [T, E] scattered from (topk_idx, weights);
              dispatch_preprocess (counts, all-gather of counts, splits, permute),
              token_dispatch (all-to-all of tokens, then of probs), dispatch_postprocess
              (chunks sorted to expert-major)
    expert    the stand-in
    combine   the weighting Megatron's experts do after their activation (``experts.py``,
              non-fused path): ``(h * permuted_probs.unsqueeze(-1)).to(h.dtype)``;
              combine_preprocess (chunks back), token_combine (all-to-all),
              combine_postprocess (unpermute: scatter-add into [T, H])

Config: ``TransformerConfig(num_moe_experts=E, moe_router_topk=K, moe_token_dispatcher_type="alltoall",
expert_model_parallel_size=W, moe_permute_fusion=False, moe_router_dtype="fp32", bf16)``: dropless,
no shared experts, expert TP 1 (the fused permute is Transformer Engine's, CUDA only). Process
groups: ep = tp_ep = the bench's group, expt_tp = tp = a group of this rank alone.

On the CPU (neither changes dispatcher logic):

* import shim (in the bench worker, when this baseline runs; never at flexep import):
  ``megatron.core.transformer.moe.ops.paged_stash`` does a top-level ``import triton`` and is
  reached from ``import megatron.core``; without triton a stub stands in whose kernels raise.
  Only the paged-stash feature uses it.
* :func:`cuda_calls_on_cpu` while a pass (or the construction) runs: the dispatcher's side-stream
  copy of its split sizes to the host calls ``torch.cuda.Stream``/``current_stream``/``stream``
  and ``record_event().synchronize()``, and ``tensor_parallel/mappings.py`` allocates collective
  outputs on ``torch.cuda.current_device()``. On the CPU these become the CPU stream (every call a
  no-op) and device. ``maybe_move_tensor_to_cpu`` (as the dispatcher module imported it) only
  converts CUDA tensors; its CPU stand-in returns what the CUDA branch returns (host tensors,
  NumPy arrays where asked), else the split sizes stay tensors and
  ``ProcessGroup.all_to_all_single`` rejects them.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from . import harness
from .availability import Framework, check_installed, stub_triton_module

__all__ = ["FRAMEWORK", "is_available", "import_framework", "MegatronDriver", "cuda_calls_on_cpu", "run"]

FRAMEWORK = Framework(
    name="megatron", label="Megatron-Core's MoEAlltoAllTokenDispatcher", dist="megatron-core",
    version="0.19.2", modules=("megatron", "numpy"),
    install="pip install numpy packaging && pip install --no-deps --ignore-requires-python "
            "megatron-core==0.19.2")

_PAGED_STASH = "megatron.core.transformer.moe.ops.paged_stash"


def is_available() -> tuple[bool, str]:
    """``(True, version)`` when the tested Megatron-Core and NumPy are installed, else
    ``(False, why)``. Looks at installed distributions only: imports nothing."""
    return check_installed(FRAMEWORK)


def import_framework() -> types.SimpleNamespace:
    """Import what the driver needs, with the triton stub in place if triton is missing."""
    stub_triton_module(_PAGED_STASH, ("paged_stash_copy_kernel", "paged_stash_pop_kernel"),
                       GLOBAL_BLOCK_SIZE=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed ..."
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.moe import token_dispatcher
        from megatron.core.transformer.transformer_config import TransformerConfig
    return types.SimpleNamespace(ProcessGroupCollection=ProcessGroupCollection,
                                 token_dispatcher=token_dispatcher, TransformerConfig=TransformerConfig)


class _CpuStream(torch.cpu.Stream):
    """``torch.cpu.Stream`` whose ``record_event`` returns the event (the CPU one returns None,
    and the dispatcher calls ``.synchronize()`` on the result)."""

    def record_event(self, event=None):
        event = torch.cpu.Event() if event is None else event
        event.record(self)
        return event


def _move_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``moe_utils.maybe_move_tensor_to_cpu`` as its CUDA branch behaves, for host tensors."""
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        return tensor.numpy() if as_numpy else tensor
    return tensor


@contextlib.contextmanager
def cuda_calls_on_cpu(token_dispatcher_module) -> Iterator[None]:
    """Point the ``torch.cuda`` calls of the dispatcher's path at the CPU while inside; restore on
    exit, even on error.

    These are process-wide attributes and flexep's own phases run in the same process, between
    Megatron's passes: patching for the duration of a pass only keeps them out of every other
    timed phase (and out of any code that asks ``torch.cuda`` what it is).
    """
    saved = {name: getattr(torch.cuda, name) for name in ("Stream", "current_stream", "stream",
                                                          "current_device")}
    saved_move = token_dispatcher_module.maybe_move_tensor_to_cpu
    torch.cuda.Stream = _CpuStream
    torch.cuda.current_stream = torch.cpu.current_stream
    torch.cuda.stream = torch.cpu.stream
    torch.cuda.current_device = lambda: torch.device("cpu")
    token_dispatcher_module.maybe_move_tensor_to_cpu = _move_to_host
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.cuda, name, value)
        token_dispatcher_module.maybe_move_tensor_to_cpu = saved_move


class MegatronDriver(harness.Driver):
    """See the module docstring. Runs on CPU tensors (with :func:`cuda_calls_on_cpu`) or CUDA."""

    label = FRAMEWORK.label

    def __init__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 experts: int, group: Optional[dist.ProcessGroup] = None) -> None:
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"the Megatron-Core baseline runs on cpu or cuda tensors, got {x.device}")
        super().__init__(x, topk_idx, topk_weights, experts, group)
        self._mc = import_framework()
        ep = group if group is not None else dist.group.WORLD
        ranks = dist.get_process_group_ranks(ep)
        alone = None
        for r in ranks:  # new_group is collective: every rank creates every one-rank group
            g = dist.new_group([r])
            alone = g if r == dist.get_rank() else alone
        pgs = self._mc.ProcessGroupCollection(ep=ep, tp_ep=ep, expt_tp=alone, tp=alone)
        with self.context():
            config = self._mc.TransformerConfig(
                num_layers=1, hidden_size=x.size(1), num_attention_heads=1, num_moe_experts=experts,
                moe_router_topk=topk_idx.size(1), moe_token_dispatcher_type="alltoall",
                expert_model_parallel_size=self.world, moe_permute_fusion=False, moe_router_dtype="fp32",
                bf16=True, params_dtype=torch.bfloat16, add_bias_linear=False)
            first = self.rank * self.local
            self.dispatcher = self._mc.token_dispatcher.MoEAlltoAllTokenDispatcher(
                self.local, list(range(first, first + self.local)), config=config, pg_collection=pgs)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notes from its config and c10d calls
            if self.x.device.type != "cpu":
                yield
                return
            with cuda_calls_on_cpu(self._mc.token_dispatcher):
                yield

    def dispatch(self) -> tuple:
        x, idx, w = self.x, self.topk_idx, self.topk_weights
        # the router's top-k step: dense probs and routing map from the chosen experts
        logits_like = torch.zeros(x.size(0), self.experts, dtype=torch.float32, device=x.device)
        probs = logits_like.scatter(1, idx, w)
        routing_map = torch.zeros_like(logits_like).int().scatter(1, idx, 1).bool()
        d = self.dispatcher
        h, p = d.dispatch_preprocess(x.view(x.size(0), 1, x.size(1)), routing_map, probs)
        h, p = d.token_dispatch(h, p)
        rows, tokens_per_expert, permuted_probs = d.dispatch_postprocess(h, p)
        return rows, tokens_per_expert, permuted_probs, permuted_probs

    def combine(self, expert_out: torch.Tensor, permuted_probs: torch.Tensor) -> torch.Tensor:
        weighted = (expert_out * permuted_probs.unsqueeze(-1)).to(expert_out.dtype)
        d = self.dispatcher
        out = d.token_combine(d.combine_preprocess(weighted))
        return d.combine_postprocess(out).view(self.x.shape)


def run(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, experts: int,
        group: Optional[dist.ProcessGroup] = None, iters: int = 5, warmup: int = 1) -> dict:
    """Check, then time Megatron-Core's dispatch and combine on this rank (collective over
    ``group``): ``{"dispatch": [(wall, cpu), ...], "combine": [...]}``."""
    return harness.run(MegatronDriver(x, topk_idx, topk_weights, experts, group), iters, warmup)
