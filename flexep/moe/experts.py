"""The layer's compute: grouped SwiGLU experts, the dense shared expert, and the kernels'
bitwise rules.

An expert's output for a token must not depend on which other tokens share its matmul, or the
layer's result would change with the EP size and the EPLB placement. Two kernel effects break
that on the CPU, and both are neutralised here:

* elementwise kernels compute the last ``numel % (2 x vector width)`` elements with scalar code
  whose ``exp`` can differ in the last bit (:func:`pointwise` pads to a whole block);
* a one-row matrix product takes BLAS's matrix-vector path, which rounds differently from the
  matrix-matrix path (measured: 2.4e-7 on a layer output), and with a transposed weight
  (``F.linear``, the router's gate) two rows still take another path (measured at H = 64, 16
  experts). :func:`mm_rows`, :func:`linear_rows` and :meth:`GroupedExperts.forward` therefore
  give every product at least ``MIN_ROWS`` rows (zero rows, or copies of a segment's row).

With these, each row's bits depend only on its own inputs for the CPU kernels tested here
(float32, bfloat16, any row count) with one intra-op thread, as in the rank processes
:func:`flexep.launch.run_local` starts; with several, BLAS splits a product's rows between the
threads, and a share of fewer than ``MIN_ROWS`` rows takes the other path again (measured: 3 of
7 rows change at 2 threads). GPU and NPU GEMM libraries choose kernels by shape and make no such
promise.

Shape legend: S rows, H hidden, I intermediate, L local expert slots, A/B a matmul's sizes.
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["GroupedExperts", "SwiGLU", "grouped_mm", "grouped_mm_loop", "pointwise", "mm_rows",
           "linear_rows", "seeded_normal", "MIN_ROWS"]

# PyTorch's CPU elementwise kernels compute the last ``numel % (2 x vector width)`` elements with
# scalar code whose exp() can differ from the vector one in the last bit, so an element's value
# would depend on how many tokens share the call (i.e. on the EP size). Padding the flat tensor to
# a multiple of this block keeps every element on the vector path.
VECTOR_BLOCK = 256


def pointwise(fn, t: torch.Tensor) -> torch.Tensor:
    """``fn(t)`` for an elementwise ``fn``, with each element's bits independent of ``t.numel()``."""
    n = t.numel()
    flat = F.pad(t.reshape(-1), (0, (-n) % VECTOR_BLOCK))
    return fn(flat)[:n].view(t.shape)


# Fewest rows a matrix product gets (see the module docstring).
MIN_ROWS = 4


def _padded(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, MIN_ROWS - x.size(0))) if 0 < x.size(0) < MIN_ROWS else x


def mm_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [S, A] @ w [A, B]`` with each row's bits independent of S (at least MIN_ROWS rows)."""
    return (_padded(x) @ w)[:x.size(0)]


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x [S, A], weight [B, A], bias [B])`` with each row's bits independent of S."""
    return F.linear(_padded(x), weight, bias)[:x.size(0)]


def seeded_normal(shape: tuple, std: float, seed: int, name: str, index: int = 0) -> torch.Tensor:
    """A float32 normal tensor from a generator keyed by (seed, name, index): world-size free."""
    gen = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(f"{name}:{index}".encode()))
    return torch.randn(shape, generator=gen) * std


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
               sizes: Optional[list] = None) -> torch.Tensor:
    """Segment matmul: rows ``[offs[e-1], offs[e])`` of ``x: [S, A]`` times ``w[e]: [A, B]``.

    ``counts: [L] int64`` rows per segment (summing to S); ``sizes``: the same as host ints
    when the caller has them (saves the loop a device read). Returns ``[S, B]``. On CPU uses
    ``torch._grouped_mm`` when PyTorch provides it and the row strides are multiples of 16 bytes
    (its requirement), else one ``mm`` per segment; both give the same result (tested). On
    accelerators the loop runs: their grouped GEMMs have dtype and architecture limits that a
    device-neutral reference should not guess.
    """
    strides = (*x.stride()[:-1], *w.stride()[:-1])
    if hasattr(torch, "_grouped_mm") and x.device.type == "cpu" and x.stride(-1) == 1 \
            and w.stride(-1) == 1 and all(s * x.element_size() % 16 == 0 for s in strides):
        return torch._grouped_mm(x, w, offs=torch.cumsum(counts, 0).to(torch.int32))
    return grouped_mm_loop(x, w, counts, sizes)


def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                    sizes: Optional[list] = None) -> torch.Tensor:
    """The fallback of :func:`grouped_mm`: one ``mm`` per segment."""
    parts = torch.split(x, counts.tolist() if sizes is None else sizes)
    return torch.cat([p @ w[e] for e, p in enumerate(parts)]) if parts else x.new_zeros(0, w.size(-1))


class GroupedExperts(torch.nn.Module):
    """The L SwiGLU experts of this rank: ``down(silu(x @ w_gate) * (x @ w_up))``.

    Parameters: ``w_gate, w_up: [L, H, I]``, ``w_down: [L, I, H]``. ``logical_ids: [L] int64``
    (buffer) names the logical expert held by each local slot; checkpoints key weights by it.
    """

    def __init__(self, logical_ids: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logical_ids", logical_ids.to(torch.int64).clone(), persistent=False)
        self.w_gate = torch.nn.Parameter(w_gate)
        self.w_up = torch.nn.Parameter(w_up)
        self.w_down = torch.nn.Parameter(w_down)

    @classmethod
    def seeded(cls, logical_ids: torch.Tensor, hidden: int, intermediate: int, seed: int,
               dtype: torch.dtype = torch.float32) -> GroupedExperts:
        """Experts initialised per logical id (a replica is a copy), independent of placement."""
        def init(name: str, shape: tuple, std: float) -> torch.Tensor:
            rows = [seeded_normal(shape, std, seed, f"experts.{name}", e) for e in logical_ids.tolist()]
            return torch.stack(rows).to(dtype)
        return cls(logical_ids, init("w_gate", (hidden, intermediate), hidden ** -0.5),
                   init("w_up", (hidden, intermediate), hidden ** -0.5),
                   init("w_down", (intermediate, hidden), intermediate ** -0.5))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x: [S, H]`` rows sorted by local expert, ``counts: [L] int64`` -> ``[S, H]``.

        A segment of fewer than ``MIN_ROWS`` rows is padded with copies of its first row (see the
        module docstring), so a row's result does not depend on how many rows its expert
        received. Example (MIN_ROWS 4): sizes ``[1, 5]`` -> rows ``[0, 0, 0, 0, 1, 2, 3, 4, 5]``.
        """
        sizes = counts.tolist()  # (the loop over segments needs them on the host anyway)
        if not any(0 < n < MIN_ROWS for n in sizes):
            return self._swiglu(x, counts, sizes)
        source: list[int] = []  # row of x behind each padded row
        keep: list[int] = []  # padded row holding each row of x
        start = 0
        for n in sizes:
            keep += range(len(source), len(source) + n)
            source += list(range(start, start + n)) + [start] * (MIN_ROWS - n if 0 < n < MIN_ROWS else 0)
            start += n
        sizes = [MIN_ROWS if 0 < n < MIN_ROWS else n for n in sizes]
        padded = torch.tensor(sizes, dtype=counts.dtype, device=counts.device)
        out = self._swiglu(x.index_select(0, torch.tensor(source, device=x.device)), padded, sizes)
        return out.index_select(0, torch.tensor(keep, device=x.device))

    def _swiglu(self, x: torch.Tensor, counts: torch.Tensor, sizes: list) -> torch.Tensor:
        gate, up = grouped_mm(x, self.w_gate, counts, sizes), grouped_mm(x, self.w_up, counts, sizes)
        return grouped_mm(pointwise(F.silu, gate) * up, self.w_down, counts, sizes)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [L, C, H]`` fixed-capacity slots -> ``[L, C, H]`` with one ``bmm`` per projection."""
        h = F.silu(torch.bmm(x, self.w_gate)) * torch.bmm(x, self.w_up)
        return torch.bmm(h, self.w_down)


class SwiGLU(torch.nn.Module):
    """Dense SwiGLU MLP ``[T, H] -> [T, H]`` (the shared experts), seeded like the experts.

    With ``gated`` (Qwen2-MoE's ``shared_expert_gate``), the output is scaled per token by
    ``sigmoid(x @ w_shared_gate)``, ``w_shared_gate: [H, 1]``.
    """

    def __init__(self, hidden: int, intermediate: int, seed: int, dtype: torch.dtype,
                 gated: bool = False) -> None:
        super().__init__()
        self.w_gate = torch.nn.Parameter(seeded_normal((hidden, intermediate), hidden ** -0.5, seed,
                                                       "shared.w_gate").to(dtype))
        self.w_up = torch.nn.Parameter(seeded_normal((hidden, intermediate), hidden ** -0.5, seed,
                                                     "shared.w_up").to(dtype))
        self.w_down = torch.nn.Parameter(seeded_normal((intermediate, hidden), intermediate ** -0.5,
                                                       seed, "shared.w_down").to(dtype))
        self.w_shared_gate = torch.nn.Parameter(seeded_normal((hidden, 1), hidden ** -0.5, seed,
                                                              "shared.gate").to(dtype)) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = mm_rows(pointwise(F.silu, mm_rows(x, self.w_gate)) * mm_rows(x, self.w_up), self.w_down)
        if self.w_shared_gate is not None:
            out = pointwise(torch.sigmoid, mm_rows(x, self.w_shared_gate)) * out
        return out
