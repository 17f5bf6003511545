"""H200 nodes (NVLink4 450 GB/s per direction, 4.8 TB/s HBM3e), one ConnectX-7 400 Gb/s
InfiniBand NIC per GPU."""

from .h100_ib import PRESET as _H100

PRESET = {
    **_H100,
    "name": "h200_ib",
    "description": "8x H200 per node, NVLink 450 GB/s/dir, 1x CX7 400 Gb/s InfiniBand per GPU, "
                   "rail-optimized leaf-spine, adaptive routing",
    "gpu": {"name": "H200", "sms": 132, "hbm_gbs": 4800.0},
}
