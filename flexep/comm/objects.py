"""Gather small Python objects over a process group without NumPy.

``torch.distributed.all_gather_object`` converts its buffers with ``Tensor.numpy()``, which the
CPU wheel of PyTorch cannot do without NumPy installed (``RuntimeError: Numpy is not
available``). flexep needs no NumPy, so it moves pickled bytes as ``uint8`` tensors itself.
"""

from __future__ import annotations

import ctypes
import pickle
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["all_gather_bytes", "all_gather_object"]


def _to_bytes(t: torch.Tensor) -> bytes:
    t = t.to("cpu").contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel()) if t.numel() else b""


def all_gather_bytes(group: Optional[dist.ProcessGroup], payload: bytes,
                     device: Optional[torch.device] = None) -> list[bytes]:
    """Every rank's ``payload``, in group rank order (collective; two small all-gathers).

    ``device`` is where the buffers travel: a device ``group`` can move (default ``cpu``).
    """
    device = device or torch.device("cpu")
    world = dist.get_world_size(group)
    # Gloo copies gathered tensors into the outputs on its own thread, where an inference mode
    # the caller runs under does not reach (seen with torch 2.4): outputs made here are plain tensors.
    with torch.inference_mode(False):
        size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        lengths = [int(s.item()) for s in sizes]
        longest = max(lengths)
        data = torch.zeros(longest, dtype=torch.uint8)
        if payload:
            data[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        data = data.to(device)
        parts = [torch.empty_like(data) for _ in range(world)]
        dist.all_gather(parts, data, group=group)
    return [_to_bytes(p[:n]) for p, n in zip(parts, lengths)]


def all_gather_object(group: Optional[dist.ProcessGroup], obj: Any,
                      device: Optional[torch.device] = None) -> list[Any]:
    """``all_gather_object`` for picklable ``obj``, NumPy-free. Returns one object per rank."""
    return [pickle.loads(b) for b in all_gather_bytes(group, pickle.dumps(obj), device)]
