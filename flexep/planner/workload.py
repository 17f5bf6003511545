"""Model shape: what one MoE layer's dispatch and combine carry.

Row sizes follow what flexep puts on the wire (and what DeepEP's kernels carry): a dispatched
row is the token (FP8, INT8 or BF16), its scales, its top-k ids (int64) and weights (float32)
and a 4-byte source index; a combined row is the BF16 token plus its top-k weights. The
low-latency mode sends one message per (token, expert): DeepEP's FP8 message is the token, its
scales and a 16-byte header; its BF16 combine message is the token. FP8 carries one float32
scale per ``scale_block`` channels, INT8 one float32 scale per token (Ascend's DeepEP port).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelShape", "DTYPE_BYTES"]

DTYPE_BYTES = {"fp8": 1, "int8": 1, "bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class ModelShape:
    """One MoE layer's communication shape.

    Attributes:
        tokens_per_rank: T, tokens each rank dispatches.
        hidden: H.
        topk: K, experts per token.
        num_experts: E (routed experts, laid out contiguously over the EP ranks).
        dispatch_dtype: ``"fp8"``, ``"int8"``, ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        combine_dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        scale_block: channels per FP8 scale (128); scales are ``scale_bytes`` each (float32).
    """

    tokens_per_rank: int = 4096
    hidden: int = 7168
    topk: int = 8
    num_experts: int = 256
    dispatch_dtype: str = "fp8"
    combine_dtype: str = "bf16"
    scale_block: int = 128
    scale_bytes: int = 4

    def __post_init__(self) -> None:
        for name in ("tokens_per_rank", "hidden", "topk", "num_experts", "scale_block"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "tokens_per_rank" else 1):
                raise ValueError(f"ModelShape.{name} must be a positive int, got {v!r}")
        for name in ("dispatch_dtype", "combine_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ValueError(f"ModelShape.{name} must be one of {sorted(DTYPE_BYTES)}, "
                                 f"got {getattr(self, name)!r}")
        if self.combine_dtype in ("fp8", "int8"):
            raise ValueError(f"ModelShape.combine_dtype cannot be {self.combine_dtype}: combine sums "
                             f"in BF16 or wider")
        if self.topk > self.num_experts:
            raise ValueError(f"ModelShape.topk ({self.topk}) must be <= num_experts ({self.num_experts})")
        if self.dispatch_dtype == "fp8" and self.hidden % self.scale_block:
            raise ValueError(f"ModelShape.hidden ({self.hidden}) must be a multiple of scale_block "
                             f"({self.scale_block}) for FP8 dispatch")

    @property
    def scales_bytes(self) -> int:
        """Scale bytes per token: one per ``scale_block`` channels for FP8, one per token for
        INT8, 0 for the other dtypes."""
        if self.dispatch_dtype == "int8":
            return self.scale_bytes
        if self.dispatch_dtype != "fp8":
            return 0
        return self.hidden // self.scale_block * self.scale_bytes

    @property
    def quantized(self) -> bool:
        """The dispatch casts tokens to a narrower type (FP8 or INT8) on the way out."""
        return self.dispatch_dtype in ("fp8", "int8")

    def dispatch_row_bytes(self) -> int:
        """Bytes of one dispatched row: data, scales, K ids (8 B) and weights (4 B), source index."""
        return self.hidden * DTYPE_BYTES[self.dispatch_dtype] + self.scales_bytes + self.topk * 12 + 4

    def combine_row_bytes(self) -> int:
        """Bytes of one combined row: data and the K weights (4 B each)."""
        return self.hidden * DTYPE_BYTES[self.combine_dtype] + self.topk * 4

    def ll_dispatch_message_bytes(self) -> int:
        """One low-latency dispatch message (DeepEP: token, scales and a 16-byte header)."""
        return self.hidden * DTYPE_BYTES[self.dispatch_dtype] + self.scales_bytes + 16

    def ll_combine_message_bytes(self) -> int:
        """One low-latency combine message (the token, in the combine dtype)."""
        return self.hidden * DTYPE_BYTES[self.combine_dtype]

    def ll_capacity_row_bytes(self, combine: bool) -> int:
        """One row of a fixed-capacity low-latency exchange (flexep): dispatch ``align16(data +
        scales + 4 + 4K)`` (token, scales, source index, int32 ids), combine the token in the
        combine dtype plus its K float32 weights."""
        if combine:
            return self.hidden * DTYPE_BYTES[self.combine_dtype] + self.topk * 4
        raw = self.hidden * DTYPE_BYTES[self.dispatch_dtype] + self.scales_bytes + 4 + 4 * self.topk
        return -(-raw // 16) * 16

    def deepep_token_bytes(self, phase: str) -> float:
        """Bytes per token as DeepEP's benchmarks count them: ``hidden * 2``, times
        ``(1 + 4/128) / 2`` for an FP8 dispatch (no metadata); INT8: data plus its scale."""
        if phase == "dispatch" and self.quantized:
            return self.hidden + self.scales_bytes
        dtype = self.dispatch_dtype if phase == "dispatch" else self.combine_dtype
        return self.hidden * DTYPE_BYTES[dtype]
