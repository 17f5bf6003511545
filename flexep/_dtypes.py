"""Dtype facts shared by the transport and the checks."""

from __future__ import annotations

import torch

FLOAT8_DTYPES = frozenset(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, n)
)


def wire_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a dtype every backend can move (float8 -> uint8 of the same bytes)."""
    return t.view(torch.uint8) if t.dtype in FLOAT8_DTYPES else t


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides. ``contiguous()`` alone keeps the stride of a size-1 dimension
    (a column-major ``[T, 1]`` scale tensor has strides ``(1, T_pad)``), and a view as a dtype of
    another element size refuses a last stride other than 1."""
    t = t.contiguous()
    if t.dim() and t.stride(-1) != 1:
        t = t.clone(memory_format=torch.contiguous_format)
    return t
