"""FP8 e4m3 per-token, per-128-channel block quantisation (DeepSeek's "ptp128c").

For each token and each block of 128 channels: ``amax = max(1e-4, max|x|)``; the stored scale
is ``amax / 448`` and the value ``x * 448 / amax`` in e4m3. With ``round_scale`` the scale is
rounded up to a power of two (``2 ** ceil(log2(amax / 448))``) and the value is ``x / scale``;
with ``use_ue8m0`` those power-of-two scales are stored as their biased exponent byte, four
bytes packed little-endian into an int32 (block ``4p + b`` in byte ``b``).

Everything here is plain elementwise tensor math with static shapes, so it can run inside a
CUDA graph or ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import Tuple

import torch

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
    """Quantise ``x: [..., H]`` (H a multiple of 128) to ``(e4m3 [..., H], scales)``.

    Scales are ``[..., H/128] float32``, or ``[..., H/512] int32`` packed UE8M0 when
    ``use_ue8m0`` (which needs ``round_scale`` and H a multiple of 512).
    """
    hidden = x.size(-1)
    if hidden % BLOCK:
        raise ValueError(f"x: hidden size must be a multiple of {BLOCK} for FP8, got {hidden}")
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0=True requires round_scale=True")
    blocks = x.float().unflatten(-1, (hidden // BLOCK, BLOCK))
    amax = blocks.abs().amax(-1).clamp_min(1e-4)
    scale = amax / FP8_MAX
    if round_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (blocks / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(fp8_dtype()).flatten(-2)
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


def per_token_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantise ``(e4m3 [..., H], scales [..., H/128] float32 or packed int32) -> float32``."""
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales)
    blocks = x_fp8.float().unflatten(-1, (x_fp8.size(-1) // BLOCK, BLOCK))
    return (blocks * scales.float().unsqueeze(-1)).flatten(-2)
