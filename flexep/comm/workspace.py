"""Reusable scratch memory for one ``Buffer``'s internal tensors.

A fresh large tensor is not free on the host: the kernel hands out new pages and zeroes each on
first touch, which for a 50 MB send buffer costs more than filling it (measured 32 ms to gather
into a fresh tensor, 3.6 ms into a reused one). Accelerator caching allocators avoid this, and
DeepEP preallocates its buffers for the same reason. flexep keeps one growing byte buffer per
internal role (send rows, returned rows, reduction tiles) and hands out views of it.

Only tensors that never leave a call live here; everything returned to the caller is freshly
allocated, so results stay valid across later calls.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Workspace"]


class Workspace:
    """Named scratch tensors, reused across calls; each name holds one tensor at a time."""

    def __init__(self) -> None:
        self._buffers: dict = {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised ``shape``/``dtype`` tensor backed by the buffer called ``name``.

        The previous tensor handed out under ``name`` is overwritten by the caller's writes.
        """
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < nbytes or buf.device != torch.device(device):
            # Grow with headroom so slowly growing token counts do not reallocate every call.
            buf = torch.empty(max(nbytes + nbytes // 8, 64), dtype=torch.uint8, device=device)
            self._buffers[name] = buf
        return buf[:nbytes].view(dtype).view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return sum(b.numel() for b in self._buffers.values())

    def clear(self) -> None:
        """Release every buffer (the next call allocates again)."""
        self._buffers.clear()
