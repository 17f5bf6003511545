"""LogFMT: DeepEP's lossy 10-bit combine encoding (``low_latency_combine(..., use_logfmt=True)``).

Format (DeepEP ``csrc/kernels/internode_ll.cu``, ``logfmt_encode``/``decode_and_accumulate``;
see ``docs/low-latency.md``). A row of H BF16 values is cut into divisions of 128 channels.

* Metadata, at the head of the row: per division ``amax = max|x|`` and ``amin = min|x|`` as two
  BF16 values (4 bytes), H/32 bytes per row.
* ``Lmax = log2(amax)``, ``Lmin = max(log2(amin), Lmax - 32)`` (``Lmax - 32`` when amin is 0),
  ``step = (Lmax - Lmin) / 510``. A magnitude ``a`` becomes the 9-bit code
  ``floor(max(log2(a) / step + 2 - rho - Lmin / step, 0))`` with ``rho = log2((1 + 2^step) / 2)
  / step``: the nearest of ``v_c = 2^(Lmin + (c - 1) step)`` (c >= 1) in the linear domain,
  code 0 meaning 0. Decoding gives ``v_c`` with the sign bit kept.
* Payload: every 16 values become 20 bytes: sixteen 9-bit codes as one LSB-first 144-bit
  stream, then the 16 sign bits (five little-endian uint32 words).

DeepEP casts a division only when it is *castable* -- ``Lmax < 0`` (every ``|x| < 1``) and
``Lmin < Lmax`` (not all magnitudes equal) -- and otherwise sends the whole 1024-channel stage as
raw BF16, so its messages have a data-dependent length. flexep's low-latency exchange has static
shapes (no host read), so its rows have one fixed size, DeepEP's all-cast size
``H/32 + 1.25 H`` bytes (9184 for H = 7168, 64% of BF16). Divisions DeepEP would not cast are
encoded in the same bits:

* all zero: every code 0 (exact, signs kept);
* for all of these, the metadata's ``amin`` is the smallest *non-zero* magnitude (zeros still
  code 0), so a zero does not widen the grid to ``Lmax - 32``;
* constant non-zero magnitude (``amin == amax``): code 511 decodes to ``amax`` itself (exact);
* some ``|x| >= 1``: the formula above (any ``Lmax`` works) on that tightest grid, with the
  relative error of a castable division of that dynamic range, where DeepEP would send the
  stage losslessly;
* an Inf or NaN: the division's ``amax`` is stored as NaN and every value of it decodes to NaN
  (DeepEP sends Inf losslessly and turns NaN inside a castable stage into 0).

Castable divisions are encoded bit for bit as DeepEP's formulas give them in float32 (DeepEP's
GPU uses approximate ``lg2``/``ex2``, so codes may differ by one near a rounding boundary; the
fused multiply-adds are emulated in float64). Row bytes equal DeepEP's message when every stage
is cast.

Everything is elementwise tensor math on the input's device with static shapes.
"""

from __future__ import annotations

import torch

__all__ = ["DIVISION", "row_bytes", "encode", "decode", "castable", "division_stats"]

DIVISION = 128
_GROUP = 16  # values per 20-byte group
_CODES = 510.0  # N - 2 with N = 2^9
_CLIP = 32.0


def row_bytes(hidden: int) -> int:
    """Bytes of one encoded row: ``hidden/32`` metadata + ``1.25 * hidden`` payload.

    Example: hidden 7168 -> 224 + 8960 = 9184.
    """
    _check_hidden(hidden)
    return hidden // 32 + hidden * 10 // 8


def _check_hidden(hidden: int) -> None:
    if hidden % DIVISION:
        raise ValueError(f"LogFMT needs hidden to be a multiple of {DIVISION}, got {hidden}")


def _magnitudes(x: torch.Tensor):
    """``(a float32 [N, D, 128], sign int64 [N, D, 128], amax bf16 [N, D], amin bf16 [N, D],
    amin_nonzero bf16 [N, D], nonfinite bool [N, D])`` of BF16 rows ``x: [N, H]``
    (``amin_nonzero`` is 0 for an all-zero division)."""
    n, hidden = x.shape
    bits = x.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    sign = (bits >> 15).to(torch.int64).view(n, -1, DIVISION)
    mag_bits = (bits & 0x7FFF).to(torch.int16)
    mag = mag_bits.view(torch.bfloat16).view(n, -1, DIVISION)
    nonfinite = (mag_bits.view(n, -1, DIVISION) >= 0x7F80).any(-1)
    amax = mag.amax(-1)
    amin_nonzero = mag.masked_fill(mag == 0, float("inf")).amin(-1)
    amin_nonzero = torch.where(amax == 0, amax, amin_nonzero)
    return mag.float(), sign, amax, mag.amin(-1), amin_nonzero, nonfinite


def division_stats(amax: torch.Tensor, amin: torch.Tensor):
    """``(Lmax, Lmin, step)`` float32 from the metadata ``amax``/``amin`` (BF16, ``[..., D]``)."""
    lmax = torch.log2(amax.float())
    lmin = torch.where(amin == 0, lmax - _CLIP, torch.maximum(torch.log2(amin.float()), lmax - _CLIP))
    return lmax, lmin, (lmax - lmin) / _CODES


def castable(amax: torch.Tensor, amin: torch.Tensor) -> torch.Tensor:
    """DeepEP's rule, per division: ``Lmax < 0 and Lmin < Lmax`` (bool, ``[..., D]``).

    False for all-zero divisions, constant magnitudes, any ``|x| >= 1``, Inf and NaN.
    """
    lmax, lmin, _ = division_stats(amax, amin)
    return (lmax < 0) & (lmin < lmax)


def encode(x: torch.Tensor) -> torch.Tensor:
    """BF16 rows ``x: [N, H]`` -> encoded rows ``[N, row_bytes(H)] uint8``."""
    if x.dtype != torch.bfloat16:
        raise TypeError(f"LogFMT encodes bfloat16 rows, got {x.dtype}")
    n, hidden = x.shape
    _check_hidden(hidden)
    a, sign, amax, amin, amin_nonzero, nonfinite = _magnitudes(x)
    # Divisions DeepEP would send raw get the tightest grid: from the smallest non-zero magnitude
    # (zeros still code 0) instead of the Lmax - 32 a zero forces.
    amin = torch.where(castable(amax, amin), amin, amin_nonzero)
    constant = (amin == amax) & (amax > 0)
    degenerate = nonfinite | constant | (amax == 0)
    # Degenerate divisions go through the formula with harmless stand-ins, then are overridden.
    safe_max = torch.where(degenerate, torch.ones_like(amax), amax)
    safe_min = torch.where(degenerate, torch.full_like(amin, 0.5), amin)
    lmax, lmin, step = division_stats(safe_max, safe_min)
    step_inv = 1.0 / step
    rounding = 2.0 - torch.log2((1.0 + torch.exp2(step)) * 0.5) * step_inv
    fused = rounding - lmin * step_inv
    # log2(a) * step_inv + fused is one fused multiply-add in DeepEP's build: exact product and
    # sum in float64, one rounding to float32, then floor.
    t = (torch.log2(a).double() * step_inv.double().unsqueeze(-1) + fused.double().unsqueeze(-1)).float()
    code = torch.floor(torch.clamp_min(t, 0.0)).to(torch.int64)
    code = torch.where(constant.unsqueeze(-1) & (a > 0), 511, code)
    code = torch.where((nonfinite | (amax == 0)).unsqueeze(-1), 0, code)
    meta_max = torch.where(nonfinite, torch.full_like(amax, float("nan")), amax)
    meta = (meta_max.view(torch.int16).to(torch.int64) & 0xFFFF) | \
        ((amin.view(torch.int16).to(torch.int64) & 0xFFFF) << 16)
    words = _pack(code.view(n, -1, _GROUP), sign.view(n, -1, _GROUP))
    out = torch.cat([meta, words.flatten(1)], 1)
    return out.to(torch.int32).view(torch.uint8).view(n, row_bytes(hidden))


def decode(rows: torch.Tensor, hidden: int) -> torch.Tensor:
    """Encoded rows ``[N, row_bytes(hidden)] uint8`` -> ``[N, hidden] float32``."""
    _check_hidden(hidden)
    n = rows.size(0)
    divisions = hidden // DIVISION
    words = rows.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    meta = words[:, :divisions]
    amax = (meta & 0xFFFF).to(torch.int16).view(torch.bfloat16)
    amin = ((meta >> 16) & 0xFFFF).to(torch.int16).view(torch.bfloat16)
    code, sign = _unpack(words[:, divisions:].view(n, -1, 5))
    code, sign = code.view(n, divisions, DIVISION), sign.view(n, divisions, DIVISION)
    lmax, lmin, step = division_stats(amax, amin)
    # (code - 1) * step + Lmin: a fused multiply-add in DeepEP's build, emulated as in encode.
    exponent = ((code - 1).double() * step.double().unsqueeze(-1) + lmin.double().unsqueeze(-1)).float()
    mag = torch.exp2(exponent)
    constant = (amin == amax).unsqueeze(-1)
    mag = torch.where(constant, amax.float().unsqueeze(-1).expand_as(mag), mag)
    mag = torch.where(code == 0, 0.0, mag)
    mag = torch.where(torch.isnan(amax).unsqueeze(-1), float("nan"), mag)
    return torch.where(sign.bool(), -mag, mag).view(n, hidden)


def _layout():
    """For each of the 5 words of a group, the (value j, shift) pairs of the codes it holds:
    code j occupies stream bits ``[9j, 9j + 9)``; a positive shift moves it left into the word."""
    out = []
    for word in range(5):
        parts = []
        for j in range(_GROUP):
            lo, hi = 9 * j, 9 * j + 9
            if lo < 32 * word + 32 and hi > 32 * word:
                parts.append((j, lo - 32 * word))
        out.append(parts)
    return out


_WORDS = _layout()


def _pack(code: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``code, sign: [N, G, 16] int64`` -> ``[N, G, 5]`` uint32 values held in int64."""
    words = []
    for word, parts in enumerate(_WORDS):
        w = torch.zeros(code.shape[:-1], dtype=torch.int64, device=code.device)
        for j, shift in parts:
            c = code[..., j]
            w |= (c << shift) if shift >= 0 else (c >> -shift)
        if word == 4:
            for j in range(_GROUP):
                w |= sign[..., j] << (16 + j)
        words.append(w & 0xFFFFFFFF)
    return torch.stack(words, -1)


def _unpack(words: torch.Tensor):
    """Inverse of :func:`_pack`: ``[N, G, 5]`` -> ``(code, sign)`` ``[N, G*16]`` int64."""
    codes = []
    for j in range(_GROUP):
        c = torch.zeros(words.shape[:-1], dtype=torch.int64, device=words.device)
        for word, parts in enumerate(_WORDS):
            for jj, shift in parts:
                if jj == j:
                    w = words[..., word]
                    c |= (w >> shift) if shift >= 0 else (w << -shift)
        codes.append(c & 0x1FF)
    signs = [(words[..., 4] >> (16 + j)) & 1 for j in range(_GROUP)]
    n = words.size(0)
    return torch.stack(codes, -1).view(n, -1), torch.stack(signs, -1).view(n, -1)
