"""FP8 e4m3 per-token, per-128-channel block quantisation (DeepSeek's "ptp128c"): the one pair
of casts flexep uses everywhere (``flexep.utils`` re-exports it under DeepEP's names).

For each token and each block of 128 channels: ``amax = max(1e-4, max|x|)``; the stored scale
is ``amax / 448`` and the value ``x * (448 / amax)`` in e4m3, as DeepEP's kernels and test
utilities compute it. With ``round_scale`` the scale is rounded up to a power of two
(``2 ** ceil(log2(amax / 448))``) and the value is ``x / scale``; with ``use_ue8m0`` those
power-of-two scales are stored as their biased exponent byte, four bytes packed little-endian
into an int32 (block ``4p + b`` in byte ``b``).

Everything here is plain elementwise tensor math with static shapes, so it can run inside a
CUDA graph or ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["FP8_MAX", "BLOCK", "per_token_cast_to_fp8", "per_token_cast_back", "pack_ue8m0",
           "unpack_ue8m0", "fp8_dtype"]

FP8_MAX = 448.0
BLOCK = 128


def fp8_dtype() -> torch.dtype:
    """``torch.float8_e4m3fn`` (raises ``RuntimeError`` on a torch build without it)."""
    if not hasattr(torch, "float8_e4m3fn"):
        raise RuntimeError("this torch build has no float8_e4m3fn; FP8 paths need torch >= 2.1")
    return torch.float8_e4m3fn


def per_token_cast_to_fp8(x: torch.Tensor, round_scale: bool = False,
                          use_ue8m0: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x: [..., H]`` to ``(e4m3 [..., H], scales)``, DeepEP's arithmetic.

    Per token and block of 128 channels (H is zero-padded up to a multiple of 128 for the block
    maxima): ``amax = max(|x|, 1e-4)``; the value is ``x * (448 / amax)`` and the scale
    ``amax / 448``, float32 ``[..., ceil(H/128)]``. With ``round_scale`` the scale is
    ``2 ** ceil(log2(amax / 448))`` and the value ``x / scale``; ``use_ue8m0`` (needs
    ``round_scale`` and H % 512 == 0) packs those scales as exponent bytes, ``[..., H/512] int32``.
    """
    hidden = x.size(-1)
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0=True requires round_scale=True")
    aligned = -(-hidden // BLOCK) * BLOCK
    blocks = F.pad(x.float(), (0, aligned - hidden)).unflatten(-1, (aligned // BLOCK, BLOCK))
    amax = blocks.abs().amax(-1).clamp_min(1e-4)
    if round_scale:
        scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
        values = blocks / scale.unsqueeze(-1)
    else:
        scale = amax / FP8_MAX
        values = blocks * (FP8_MAX / amax).unsqueeze(-1)
    # In range by construction; the clamp only guards the last bit of float rounding (e4m3fn
    # has no infinity: an overflow would become NaN).
    q = values.clamp(-FP8_MAX, FP8_MAX).to(fp8_dtype()).flatten(-2)[..., :hidden].contiguous()
    if use_ue8m0:
        return q, pack_ue8m0(scale)
    return q, scale


def pack_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales ``[..., S]`` -> packed exponent bytes ``[..., S/4] int32``."""
    if scale.size(-1) % 4:
        raise ValueError(f"scales: UE8M0 packing needs a multiple of 4 blocks (H % 512 == 0), "
                         f"got {scale.size(-1)} blocks")
    exp = (scale.contiguous().view(torch.int32) >> 23) & 0xFF
    exp = exp.unflatten(-1, (scale.size(-1) // 4, 4))
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int32, device=scale.device)
    return (exp << shifts).sum(-1, dtype=torch.int32)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_ue8m0`: ``[..., S/4] int32 -> [..., S] float32``."""
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int32, device=packed.device)
    exp = (packed.unsqueeze(-1) >> shifts) & 0xFF
    return (exp.flatten(-2) << 23).view(torch.float32)


def per_token_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor,
                        dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantise ``(e4m3 [..., H], scales) -> [..., H]`` of ``dtype`` (DeepEP's: bf16).

    ``scales``: float32 ``[..., ceil(H/128)]`` or packed UE8M0 ``[..., H/512] int32``, any
    strides (e.g. the token-contiguous low-latency layout); as in DeepEP only the scales' order
    matters (row by row), not their shape. Computed in float32.
    """
    if scales.dtype == torch.int32:  # four exponent bytes per word, in order
        scales = unpack_ue8m0(scales.reshape(-1))
    hidden = x_fp8.size(-1)
    aligned = -(-hidden // BLOCK) * BLOCK
    scales = scales.reshape(*x_fp8.shape[:-1], aligned // BLOCK)
    values = F.pad(x_fp8.float(), (0, aligned - hidden)).unflatten(-1, (aligned // BLOCK, BLOCK))
    return (values * scales.float().unsqueeze(-1)).flatten(-2)[..., :hidden].to(dtype)
