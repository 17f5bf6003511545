"""``deep_ep.utils.refs``: DeepEP V2's pure-torch reference functions, in DeepEP's signatures.

``generate_pre_combine_data``, ``ordered_accumulate`` and ``combine`` are local; ``dispatch`` is
collective (it gathers every rank's inputs on the host and evaluates
:func:`flexep.reference_v2.ref_v2_dispatch`). They are test utilities: the oracle flexep checks
itself against is :mod:`flexep.reference_v2`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from ..comm.objects import all_gather_object
from ..reference_v2 import pre_combine_data, ref_v2_combine, ref_v2_dispatch
from .envs import get_global_seed

__all__ = ["dispatch", "generate_pre_combine_data", "ordered_accumulate", "combine"]


def dispatch(x, topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor], num_max_tokens_per_rank: int,
             num_experts: int, group: Optional[dist.ProcessGroup] = None):
    """``(recv_x, recv_topk_idx, recv_topk_weights, recv_src_token_idx, num_recv_tokens_per_rank)``,
    rows sorted by ``src_token_global_idx`` (collective over ``group``; host gather)."""
    fp8 = isinstance(x, tuple)
    data, sf = x if fp8 else (x, None)
    host = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    mine = (host(data), host(sf), host(topk_idx), host(topk_weights))
    every = all_gather_object(group, mine)
    ref = ref_v2_dispatch([e[0] for e in every], [e[2] for e in every], num_experts, num_max_tokens_per_rank,
                          1,
                          [e[3] for e in every] if topk_weights is not None else None,
                          [e[1] for e in every] if fp8 else None)[dist.get_rank(group)]
    dev = data.device
    recv_x = (ref.recv_x.to(dev), ref.recv_scales.to(dev)) if fp8 else ref.recv_x.to(dev)
    weights = ref.recv_topk_weights.to(dev) if ref.recv_topk_weights is not None else None
    return (recv_x, ref.recv_topk_idx.to(dev), weights, torch.tensor(ref.src_global, dtype=torch.int,
                                                                     device=dev),
            torch.tensor(ref.recv_per_source, dtype=torch.int))


def generate_pre_combine_data(src_token_global_idx: torch.Tensor, num_max_tokens_per_rank: int, num_topk: int,
                              hidden: int) -> torch.Tensor:
    """DeepEP's deterministic combine payload ``[n, K, H]`` bf16 (see
    :func:`flexep.reference_v2.pre_combine_data`)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    out = pre_combine_data(src_token_global_idx.cpu(), num_max_tokens_per_rank, num_topk, hidden, world,
                           get_global_seed())
    return out.to(src_token_global_idx.device)


def ordered_accumulate(data: torch.Tensor, initial_value: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float32 sum over the top-k dimension of ``data [n, K, H]`` in order (from
    ``initial_value`` or zero), rounded once to ``data``'s dtype."""
    if initial_value is None:
        acc = torch.zeros((data.shape[0], data.shape[2]), dtype=torch.float32, device=data.device)
    else:
        acc = initial_value.float().clone()
    for k in range(data.shape[1]):
        acc += data[:, k, :].float()
    return acc.to(data.dtype)


def combine(y: torch.Tensor, topk_idx: torch.Tensor, num_scaleout_ranks: int, num_scaleup_ranks: int,
            num_experts: int, bias: Union[None, torch.Tensor, tuple], reduce_in_local: bool,
            reduce_in_scaleup: bool) -> torch.Tensor:
    """DeepEP V2's combine recipe on ``y [n, K, H]`` (see :func:`flexep.reference_v2.ref_v2_combine`)."""
    biases = () if bias is None else (bias,) if isinstance(bias, torch.Tensor) else tuple(bias)
    world = num_scaleout_ranks * num_scaleup_ranks
    out = ref_v2_combine(y.cpu(), topk_idx.cpu(), num_experts, world, num_scaleup_ranks,
                         tuple(b.cpu() for b in biases), reduce_in_local, reduce_in_scaleup)
    return out.to(y.device)
