"""DeepEP's ``Config``: chunking knobs of the normal kernels, kept for API compatibility.

flexep moves whole per-peer blocks, so these values never change results; they are validated
with DeepEP's rules, carried through, and used for the buffer-size hints and the handle's
channel matrices (``num_channels = num_sms / 2``, as in DeepEP).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Config", "dispatch_config", "combine_config", "NUM_MAX_NVL_PEERS"]

NUM_MAX_NVL_PEERS = 8
_TOPK_IDX_BYTES = 8


@dataclass(frozen=True)
class Config:
    """``Config(num_sms=20, nvl_send=6, nvl_recv=256, rdma_send=6, rdma_recv=256)`` as DeepEP.

    Args:
        num_sms: SMs the CUDA kernels would use; ``num_sms / 2`` channels. Must be >= 0.
        num_max_nvl_chunked_send_tokens: chunk size inside a node, > 0 and < the recv size.
        num_max_nvl_chunked_recv_tokens: ring capacity inside a node, > 0.
        num_max_rdma_chunked_send_tokens: chunk size across nodes, > 0.
        num_max_rdma_chunked_recv_tokens: ring capacity across nodes, rounded up to a multiple of
            the send chunk, which must then be at most half of it.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                     "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"Config.{name} must be an int, got {type(v).__name__}")
        if self.num_sms < 0:
            raise ValueError(f"Config.num_sms must be >= 0, got {self.num_sms}")
        nvl_send, nvl_recv = self.num_max_nvl_chunked_send_tokens, self.num_max_nvl_chunked_recv_tokens
        if not 0 < nvl_send < nvl_recv:
            raise ValueError("Config needs 0 < num_max_nvl_chunked_send_tokens < "
                             f"num_max_nvl_chunked_recv_tokens, got {nvl_send} and {nvl_recv}")
        rdma_send, rdma_recv = self.num_max_rdma_chunked_send_tokens, self.num_max_rdma_chunked_recv_tokens
        if rdma_send <= 0 or rdma_recv <= 0:
            raise ValueError("Config RDMA chunk sizes must be > 0, got "
                             f"send {rdma_send} and recv {rdma_recv}")
        rounded = (rdma_recv + rdma_send - 1) // rdma_send * rdma_send
        if rdma_send > rounded // 2:
            raise ValueError("Config needs num_max_rdma_chunked_send_tokens <= half of "
                             f"num_max_rdma_chunked_recv_tokens (rounded to {rounded}), got {rdma_send}")
        object.__setattr__(self, "num_max_rdma_chunked_recv_tokens", rounded)

    @property
    def num_channels(self) -> int:
        """DeepEP's channel count, ``max(1, num_sms // 2)``."""
        return max(1, self.num_sms // 2)

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes DeepEP's NVLink buffer would need (``hidden_bytes = hidden * max(2, elem)``)."""
        _check_rank_shape(num_ranks)
        c = self.num_sms // 2
        n, d = min(num_ranks, NUM_MAX_NVL_PEERS), max(num_ranks // NUM_MAX_NVL_PEERS, 1)
        recv = self.num_max_nvl_chunked_recv_tokens
        total = c * n * (2 * d + 3) * 4
        total += c * n * recv * (hidden_bytes + 8 + 128 * _TOPK_IDX_BYTES + 128 * 4 + 128 * 4)
        return _align(total, 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes DeepEP's RDMA buffer would need (0 within one node of <= 8 ranks)."""
        _check_rank_shape(num_ranks)
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return 0
        c, d = self.num_sms // 2, num_ranks // NUM_MAX_NVL_PEERS
        recv = self.num_max_rdma_chunked_recv_tokens
        total = c * d * (NUM_MAX_NVL_PEERS * 2 + 2) * 2 * 4
        total += 2 * c * d * recv * (hidden_bytes + 8 + 128 * _TOPK_IDX_BYTES + 128 * 4 + 128 * 4 + 16)
        return _align(total, 128)


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _check_rank_shape(num_ranks: int) -> None:
    if num_ranks < 1 or (num_ranks > NUM_MAX_NVL_PEERS and num_ranks % NUM_MAX_NVL_PEERS):
        raise ValueError(f"num_ranks must be < 8 or a multiple of 8, got {num_ranks}")


# (nvl_send, nvl_recv, rdma_send, rdma_recv) per EP size, DeepEP's tuned defaults.
_DISPATCH = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
             24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128),
             64: (32, 288, 8, 128), 96: (20, 480, 12, 128), 128: (20, 560, 12, 128),
             144: (32, 720, 12, 128), 160: (28, 720, 12, 128)}
_COMBINE = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
            24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
            96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128)}


def _lookup(table: dict, num_ranks: int, num_sms: int) -> Config:
    if num_ranks not in table:
        # DeepEP asserts; flexep runs any size, so fall back to the nearest tuned larger size.
        larger = [r for r in sorted(table) if r >= num_ranks]
        key = larger[0] if larger else max(table)
    else:
        key = num_ranks
    return Config(num_sms, *table[key])


def dispatch_config(num_ranks: int, num_sms: int) -> Config:
    """DeepEP's tuned dispatch ``Config`` for ``num_ranks`` (nearest tuned size otherwise)."""
    return _lookup(_DISPATCH, num_ranks, num_sms)


def combine_config(num_ranks: int, num_sms: int) -> Config:
    """DeepEP's tuned combine ``Config`` for ``num_ranks`` (nearest tuned size otherwise)."""
    return _lookup(_COMBINE, num_ranks, num_sms)
