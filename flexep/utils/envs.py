"""``deep_ep.utils.envs``: DeepEP V2's environment helpers, on any backend.

The group-taking domain helpers answer from flexep's topology rules (:mod:`flexep.deepep.sizing`);
hardware probes (NVLink, RDMA bandwidth and atomics) have nothing to probe and say so with
neutral values.
"""

from __future__ import annotations

import os
import random
from typing import Optional

import torch
import torch.distributed as dist

from ..deepep.sizing import get_logical_domain_size as _logical
from ..deepep.sizing import get_physical_domain_size
from . import check_nvlink_connections

__all__ = ["init_dist", "init_seed", "get_local_seed", "get_global_seed", "dist_print",
           "get_physical_domain_size", "get_logical_domain_size", "check_nvlink_connections",
           "check_torch_deterministic", "get_nvlink_gbs", "get_rdma_gbs", "check_fast_rdma_atomic_support",
           "get_sm_read_gbs", "get_sm_write_gbs"]

_seeds = {"local": 0, "global": 0}
_local_rank: Optional[int] = None


def get_logical_domain_size(group: dist.ProcessGroup, allow_hybrid_mode: bool = True) -> tuple[int, int]:
    """``(num_scaleout_ranks, num_scaleup_ranks)`` of ``group``."""
    return _logical(group, allow_hybrid_mode)


def init_seed(global_seed: int) -> None:
    """Seed torch and ``random`` with ``global_seed + rank`` (DeepEP's convention)."""
    _seeds["global"] = global_seed
    _seeds["local"] = global_seed + (dist.get_rank() if dist.is_initialized() else 0)
    torch.manual_seed(_seeds["local"])
    random.seed(_seeds["local"])


def get_local_seed() -> int:
    return _seeds["local"]


def get_global_seed() -> int:
    return _seeds["global"]


def dist_print(s: str = "", once_in_node: bool = False) -> None:
    """Print from every rank (or the first local rank of each node), then a barrier."""
    if not once_in_node or (_local_rank or 0) == 0:
        print(s, flush=True)
    if dist.is_initialized():
        dist.barrier()


def init_dist(local_rank: int, num_local_ranks: int, seed: int = 0) -> tuple[int, int, dist.ProcessGroup]:
    """DeepEP's test launcher on this process's device: ``MASTER_ADDR``/``MASTER_PORT``, nodes
    from ``WORLD_SIZE`` and this node from ``RANK`` (as DeepEP reads them); BF16 default dtype.
    Returns ``(rank, world_size, group of all ranks)``."""
    from ..device import backend_for, default_device

    global _local_rank
    _local_rank = local_rank
    num_nodes, node = int(os.getenv("WORLD_SIZE", "1")), int(os.getenv("RANK", "0"))
    device = default_device()
    if device.type != "cpu":
        getattr(torch, device.type).set_device(local_rank)
    ip, port = os.getenv("MASTER_ADDR", "127.0.0.1"), int(os.getenv("MASTER_PORT", "8361"))
    dist.init_process_group(backend_for(device.type), init_method=f"tcp://{ip}:{port}",
                            world_size=num_nodes * num_local_ranks, rank=node * num_local_ranks + local_rank)
    torch.set_default_dtype(torch.bfloat16)
    init_seed(seed)
    return dist.get_rank(), dist.get_world_size(), dist.new_group(list(range(num_nodes * num_local_ranks)))


def check_torch_deterministic() -> None:
    """DeepEP rejects deterministic mode with ``fill_uninitialized_memory``; flexep initialises
    every output, so both settings are fine here."""


def get_nvlink_gbs(factor: float = 0.9) -> float:
    """No NVLink probe on a portable backend: 0 (callers fall back to their defaults)."""
    return 0.0


def get_rdma_gbs(nic_name: str = "") -> float:
    """No RDMA probe on a portable backend: 0."""
    return 0.0


def check_fast_rdma_atomic_support(nic_name: str = "") -> bool:
    return False


def get_sm_read_gbs() -> float:
    return 180.0


def get_sm_write_gbs() -> float:
    return 45.0
