"""torchtitan 0.3.0 ``AllToAllTokenDispatcher``, driven as torchtitan's MoE layer drives it
(``torchtitan/models/common/moe.py``: ``MoE.forward`` -> ``RoutedExperts.forward``).

One pass on this rank:

    dispatch  MoE.forward's routing metadata: a bool one-hot map scattered from the top-k ids,
              tokens per expert = its sum; dispatcher.dispatch(x, scores, ids, counts): local
              argsort reorder, count all-to-all, split sync, token all-to-all, expert-major permute
    expert    the stand-in, under maybe_set_sparse_mesh() as RoutedExperts runs its experts
    combine   dispatcher.combine(out, metadata, x): unpermute, token all-to-all, fp32 weighting by
              the scores, scatter-add into [T, H]

Parallel set-up is torchtitan's own: ``ParallelDims(dp_shard=W, ep=W)`` builds the meshes over the
default process group, the dispatcher gets its EP mesh through ``wire_meshes`` (as
``RoutedExperts.parallelize`` does), and every pass runs inside ``get_spmd_context``, as the
trainer's steps do.

The SPMD backend is ``partial_dtensor``, a supported torchtitan setting in which the token
all-to-all is ``all_to_all_single``. The trainer's default, ``spmd_types``, sends uneven chunks
through the list form ``dist.all_to_all``, which Gloo rejects ("invalid tensor size").

Import shim (in the bench worker, when this baseline runs; never at flexep import):
``torchtitan.distributed.minimal_async_ep.kernels`` does a top-level ``import triton`` and
``token_dispatcher.py`` imports it unconditionally; without triton a stub module stands in whose
launchers raise. Only ``MinimalAsyncEPTokenDispatcher`` calls them.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
import torch.distributed as dist

from . import harness
from .availability import Framework, check_installed, stub_triton_module

__all__ = ["FRAMEWORK", "is_available", "import_framework", "TorchtitanDriver", "run"]

FRAMEWORK = Framework(
    name="torchtitan", label="torchtitan's AllToAllTokenDispatcher", dist="torchtitan", version="0.3.0",
    modules=("torchtitan", "spmd_types", "tyro"),
    install="pip install --no-deps torchtitan==0.3.0 spmd_types==0.2.3 tyro docstring-parser "
            "typeguard typing-extensions")

_KERNELS = "torchtitan.distributed.minimal_async_ep.kernels"
_KERNEL_NAMES = ("copy_full_counts_to_peers_kernel", "copy_rows_to_peers_kernel", "expand_topk_grad_kernel",
                 "fill_combine_metadata_kernel", "fill_dispatch_metadata_kernel",
                 "invert_flat_indices_kernel", "reduce_topk_slots_kernel", "topk_scores_grad_kernel")
SPMD_BACKEND = "partial_dtensor"


def is_available() -> tuple[bool, str]:
    """``(True, version)`` when the tested torchtitan and its import needs are installed, else
    ``(False, why)``. Looks at installed distributions only: imports nothing."""
    return check_installed(FRAMEWORK)


def import_framework() -> types.SimpleNamespace:
    """Import what the driver needs, with the triton stub in place if triton is missing."""
    stub_triton_module(_KERNELS, _KERNEL_NAMES)
    from torchtitan.distributed import parallel_dims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.distributed.spmd_types import maybe_set_sparse_mesh
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher

    return types.SimpleNamespace(parallel_dims=parallel_dims, dist_utils=dist_utils,
                                 maybe_set_sparse_mesh=maybe_set_sparse_mesh,
                                 AllToAllTokenDispatcher=AllToAllTokenDispatcher)


class TorchtitanDriver(harness.Driver):
    """See the module docstring. Uses the default process group (torchtitan builds its meshes
    over the whole world), so ``group`` must be None or the world group."""

    label = FRAMEWORK.label

    def __init__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 experts: int, group: Optional[dist.ProcessGroup] = None) -> None:
        if group is not None and dist.get_world_size(group) != dist.get_world_size():
            raise ValueError("the torchtitan baseline runs on the whole world (torchtitan builds its "
                             "meshes from the default group)")
        super().__init__(x, topk_idx, topk_weights, experts, group)
        tt = import_framework()
        # torchtitan picks "cuda" when it finds no accelerator; the meshes live where x does.
        tt.parallel_dims.device_type = x.device.type
        tt.dist_utils.set_spmd_backend(SPMD_BACKEND)  # what the trainer does from its config
        dims = tt.parallel_dims.ParallelDims(dp_replicate=1, dp_shard=self.world, cp=1, tp=1, pp=1,
                                             ep=self.world, world_size=self.world,
                                             spmd_backend=SPMD_BACKEND)
        dims.build_mesh()
        self.dispatcher = tt.AllToAllTokenDispatcher.Config(num_experts=experts,
                                                           top_k=topk_idx.size(1)).build()
        self.dispatcher.wire_meshes(ep_mesh=dims.get_optional_mesh("ep"))
        self._spmd_context = tt.dist_utils.get_spmd_context(parallel_dims=dims)
        self._sparse_mesh = tt.maybe_set_sparse_mesh

    def context(self):
        return self._spmd_context()

    def dispatch(self) -> tuple:
        x, ids, scores = self.x, self.topk_idx, self.topk_weights
        # MoE.forward on [B, L, *] with B = 1: routing map and tokens per expert
        ids_BLK = ids.unsqueeze(0)
        routing_map_BLE = torch.zeros((1, ids.size(0), self.experts), dtype=torch.bool,
                                      device=x.device).scatter_(-1, ids_BLK, True)
        tokens_per_expert_E = routing_map_BLE.sum(dim=(0, 1))
        # RoutedExperts.forward: flattened views into the dispatcher
        rows, counts, metadata = self.dispatcher.dispatch(x, scores, ids, tokens_per_expert_E)
        return rows, counts, None, metadata

    def expert(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        with self._sparse_mesh():
            return super().expert(rows, counts)

    def combine(self, expert_out: torch.Tensor, metadata) -> torch.Tensor:
        return self.dispatcher.combine(expert_out, metadata, self.x)


def run(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, experts: int,
        iters: int = 5, warmup: int = 1) -> dict:
    """Check, then time torchtitan's dispatch and combine on this rank (collective over the
    initialised world): ``{"dispatch": [(wall, cpu), ...], "combine": [...]}``."""
    return harness.run(TorchtitanDriver(x, topk_idx, topk_weights, experts), iters, warmup)
