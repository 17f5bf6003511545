"""``deep_ep.utils.testing``: timing helpers (DeepEP's ``bench``; kineto traces are CUDA-only)."""

from __future__ import annotations

from . import bench

__all__ = ["bench", "bench_kineto", "parse_num_bytes"]


def bench_kineto(fn, kernel_names, num_tests: int = 30, **kwargs):
    """DeepEP times named CUDA kernels from a profiler trace; flexep has no kernels of its own,
    so this times the whole call (mean seconds, one value per name)."""
    mean = bench(fn, num_warmups=2, num_tests=num_tests)[0]
    return mean if isinstance(kernel_names, str) else tuple(mean for _ in kernel_names)


def parse_num_bytes(text: str) -> int:
    """``"4MiB"``/``"16K"``/``"1024"`` -> bytes (binary units)."""
    units = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
             "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}
    s = text.strip().upper()
    digits = len(s) - len(s.lstrip("0123456789"))
    number, unit = s[:digits], s[digits:].strip()
    if not number or unit not in units:
        raise ValueError(f"cannot parse a byte count from {text!r} (e.g. 4MiB, 16K, 1024)")
    return int(number) * units[unit]
