"""Tensor methods for ``cuda`` device tensors, re-implemented with aten ops.

On a CPU-only build, PyTorch's C++ ``x[...]``, ``x[...] = v``, ``contiguous()``, ``copy_()``,
``int()``/``float()``, ``~x`` and ``nonzero()`` open a CUDA device guard, which does not exist, so
``emulation_tensor`` routes them here for ``cuda`` tensors (``npu`` tensors have PyTorch's Python
device guard and use the originals). Indexing follows PyTorch's own ``applySlicing``: ints
select, slices slice, ``None`` unsqueezes, ``Ellipsis`` skips, tensors and lists are advanced
indices gathered into one ``aten.index`` / ``aten.index_put_``, and a 0-dim integer tensor index
is read on the host (``.item()``), as PyTorch does.
"""

from __future__ import annotations

import torch

__all__ = ["getitem", "setitem", "contiguous", "scalar", "nonzero"]

aten = torch.ops.aten


def _is_int_index(i) -> bool:
    return isinstance(i, int) and not isinstance(i, bool)


def _as_index_tensor(item):
    if isinstance(item, torch.Tensor):
        return item
    return torch.tensor(item)  # a (nested) list: a CPU index tensor, as PyTorch builds it


def _as_tuple(index) -> tuple:
    """PyTorch's ``treatSequenceAsTuple``: a short list holding a sequence, slice, tensor, None or
    Ellipsis is a tuple of indices; any other list is one index."""
    if isinstance(index, tuple):
        return index
    if isinstance(index, list) and len(index) < 32 and any(
            isinstance(i, (list, tuple, slice, torch.Tensor)) or i is None or i is Ellipsis for i in index):
        return tuple(index)
    return (index,)


def _slicing(self, index) -> tuple[torch.Tensor, list, bool]:
    """PyTorch's ``applySlicing``: the basic-indexed view and the advanced index list."""
    index = _as_tuple(index)
    consumed = 0
    for item in index:
        if isinstance(item, torch.Tensor) and item.dtype in (torch.bool, torch.uint8) and item.dim() > 0:
            consumed += item.dim()
        elif item is None or item is Ellipsis or isinstance(item, bool):
            continue
        else:
            consumed += 1
    result, dim, indices, advanced = self, 0, [], False
    for item in index:
        if isinstance(item, torch.Tensor) and item.dim() == 0 and not item.dtype.is_floating_point:
            if item.dtype in (torch.bool, torch.uint8):
                item = bool(item.item())  # a 0-dim mask: PyTorch reads it on the host too
            else:
                item = int(item.item())  # a 0-dim index: PyTorch selects with tensor.item()
        if item is None:
            result = aten.unsqueeze.default(result, dim)
            indices.append(None)
            dim += 1
        elif item is Ellipsis:
            skip = self.dim() - consumed
            indices.extend([None] * skip)
            dim += skip
        elif isinstance(item, bool):
            result = aten.unsqueeze.default(result, dim)
            indices.append(torch.zeros(1 if item else 0, dtype=torch.int64))
            advanced = True
            dim += 1
        elif _is_int_index(item):
            result = aten.select.int(result, dim, item)
        elif isinstance(item, slice):
            step = 1 if item.step is None else item.step
            if step <= 0:
                raise ValueError("step must be greater than zero")
            result = aten.slice.Tensor(result, dim, item.start, item.stop, step)
            indices.append(None)
            dim += 1
        elif isinstance(item, (torch.Tensor, list)):
            t = _as_index_tensor(item)
            indices.append(t)
            advanced = True
            dim += t.dim() if t.dtype in (torch.bool, torch.uint8) else 1
        else:
            raise TypeError(f"emulated indexing: unsupported index {item!r}")
    while indices and indices[-1] is None:
        indices.pop()
    return result, indices, advanced


def getitem(self, index):
    result, indices, advanced = _slicing(self, index)
    if advanced:
        return aten.index.Tensor(result, indices)
    return aten.alias.default(result) if result is self else result


def setitem(self, index, value):
    result, indices, advanced = _slicing(self, index)
    if advanced:
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(value, dtype=self.dtype)
        aten.index_put_.default(result, indices, value)
    elif isinstance(value, torch.Tensor):
        value = value.squeeze(0) if value.dim() > result.dim() and value.size(0) == 1 else value
        aten.copy_.default(result, value)
    else:
        aten.fill_.Scalar(result, value)


def contiguous(self, memory_format=torch.contiguous_format):
    if self.is_contiguous(memory_format=memory_format):
        return self
    return aten.clone.default(self, memory_format=memory_format)


def scalar(self):
    if self.numel() != 1:
        raise ValueError("only one element tensors can be converted to Python scalars")
    return aten._local_scalar_dense.default(self)


def nonzero(self, *, as_tuple=False):
    return aten.nonzero_numpy.default(self) if as_tuple else aten.nonzero.default(self)
