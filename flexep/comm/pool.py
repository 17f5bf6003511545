"""Reusable tensors that may be handed to the caller: reused once nobody holds them any more.

DeepEP's low-latency kernels write into two preallocated buffer sets that alternate between
calls. flexep gets the same effect without DeepEP's rule that at most two results may be held:
a :class:`BufferPool` keeps up to ``depth`` tensors per name and hands one out again only when
nothing outside the pool still references its storage (no returned tensor, view, handle or
pending receive). A decode loop that drops the previous step's results therefore alternates
between two buffers, as DeepEP does; a caller that keeps results longer simply gets a fresh
tensor, so a returned tensor is never overwritten while it is alive.

Why it matters on the host: a fresh 200 MB tensor is cheap to allocate but every page it touches
is zeroed by the kernel on first use (with transparent huge pages, 2 MB at a time), so writing a
few rows spread over a large receive layout costs as much as clearing it. Accelerator caching
allocators avoid the cost already; there the pool only saves allocator calls.

"Still referenced" is the storage's use count (``torch._C._storage_Use_Count``): every tensor
or view of the storage holds one reference. On a torch build without it the pool never reuses.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["BufferPool"]

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _count(base: torch.Tensor) -> int:
    return _use_count(base.untyped_storage()._cdata)


def _slot(base: torch.Tensor) -> tuple:
    """``(base, baseline)``: the use count of a storage that only the pool holds."""
    return base, _count(base)


class BufferPool:
    """Named tensors reused across calls once released (see the module docstring).

    Args:
        depth: buffers kept per name; beyond it a request that finds them all in use gets a
            tensor the pool does not keep.
    """

    def __init__(self, depth: int = 2) -> None:
        self.depth = depth
        self._slots: dict = {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised ``shape``/``dtype`` tensor on ``device`` that nobody else holds.

        Its contents are whatever an earlier user left (DeepEP's buffers behave the same).
        """
        itemsize = dtype.itemsize
        nbytes = max(1, math.prod(shape) * itemsize)
        slots = self._slots.setdefault((name, device), [])
        free = self._free(slots, nbytes)
        if free is None:
            base = torch.empty(nbytes + nbytes // 8, dtype=torch.uint8, device=device)
            if _use_count is not None and len(slots) < self.depth:
                slots.append(_slot(base))
            elif _use_count is not None and slots:
                # Every kept buffer is too small or in use: replace the smallest free one, so
                # that a growing shape does not leave the pool holding stale small buffers.
                idle = [i for i, (b, c) in enumerate(slots) if _count(b) == c]
                if idle:
                    i = min(idle, key=lambda j: slots[j][0].numel())
                    slots[i] = _slot(base)
            free = base
        return free[:math.prod(shape) * itemsize].view(dtype).view(shape)

    @staticmethod
    def _free(slots: list, nbytes: int) -> Optional[torch.Tensor]:
        for base, baseline in slots:
            if base.numel() >= nbytes and _count(base) == baseline:
                return base
        return None

    @property
    def nbytes(self) -> int:
        """Bytes the pool keeps."""
        return sum(b.numel() for slots in self._slots.values() for b, _ in slots)

    def clear(self) -> None:
        """Forget every buffer (tensors already handed out stay valid)."""
        self._slots.clear()
