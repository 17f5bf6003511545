"""DeepEP V2.5's ``BufferAllocator`` (plan tensors before the buffer exists) and ``BufferBase``.

A plan hands out ``meta`` placeholders; :meth:`BufferAllocator.materialize` later swaps each one,
in place, for a view of a real byte storage, so references taken before the buffer was built
become real tensors. ``EPBuffer(..., lb_allocation_plan_or_num_bytes=plan)`` materializes the
plan onto its load-balancing storage (``buffer.runtime.lb_storage``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .sizing import get_num_allocation_alignment

__all__ = ["BufferAllocator", "BufferBase", "Runtime"]


class BufferAllocator:
    """Offsets for tensors in one storage, each allocation aligned to 2 MiB.

    Example: ``allocate((4, 1024), torch.uint8)`` then ``allocate((8,), torch.float32)`` place
    the tensors at offsets 0 and 2 MiB; ``num_bytes`` is 4 MiB.
    """

    def __init__(self) -> None:
        self.alignment = get_num_allocation_alignment()
        self.allocations: list = []
        self.num_bytes = 0
        self.materialized = False

    def allocate(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A ``meta`` placeholder of ``shape``/``dtype``, made real by :meth:`materialize`."""
        if self.materialized:
            raise RuntimeError("this BufferAllocator plan is already materialized; make a new plan")
        t = torch.empty(shape, dtype=dtype, device="meta")
        offset = -(-self.num_bytes // self.alignment) * self.alignment
        self.allocations.append((t, offset))
        self.num_bytes = -(-(offset + t.numel() * t.element_size()) // self.alignment) * self.alignment
        return t

    def materialize(self, storage: torch.Tensor) -> None:
        """Turn every placeholder into a view of ``storage`` (``uint8``, contiguous, ``num_bytes``)."""
        if self.materialized:
            raise RuntimeError("this BufferAllocator plan is already materialized")
        if not isinstance(storage,
                          torch.Tensor) or storage.dtype != torch.uint8 or not storage.is_contiguous():
            raise ValueError("storage must be a contiguous uint8 tensor")
        if storage.numel() != self.num_bytes:
            raise ValueError(f"storage must have the plan's {self.num_bytes} bytes, got {storage.numel()}")
        for t, offset in self.allocations:
            nbytes = t.numel() * t.element_size()
            view = storage[offset:offset + nbytes].view(t.dtype).view(t.shape)
            torch.utils.swap_tensors(t, view)
        self.materialized = True


@dataclass
class Runtime:
    """What a V2 buffer holds once built: the load-balancing storage (``uint8 [num_lb_bytes]``
    or None) and the core communicator."""

    lb_storage: Optional[torch.Tensor]
    comm: object

    def destroy(self) -> None:
        self.comm.destroy()


class BufferBase:
    """Common base of DeepEP V2.5 buffers: explicit destruction and the runtime."""

    def __init__(self, explicitly_destroy: bool = False) -> None:
        self.explicitly_destroy = bool(explicitly_destroy)
        self.runtime: Optional[Runtime] = None

    @property
    def main_context(self):
        """The object calls run on (flexep: the core communicator)."""
        return self.runtime.comm if self.runtime is not None else None

    def print_memory_usage(self) -> None:
        """Print the bytes this buffer holds (flexep allocates per call: the LB storage only)."""
        lb = self.runtime.lb_storage if self.runtime is not None else None
        n = 0 if lb is None else lb.numel()
        print(f"{type(self).__name__}: load-balancing storage {n} bytes ({n / math.pow(2, 20):.1f} MiB); "
              "dispatch/combine allocate per call")

    def destroy(self) -> None:
        if not self.explicitly_destroy:
            raise RuntimeError(f"destroy() needs {type(self).__name__}(..., explicitly_destroy=True)")
        if self.runtime is not None:
            self.runtime.destroy()
        self.runtime = None
