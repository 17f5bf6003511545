"""The ``h800_ib`` cluster with its network swapped for 400 GbE RoCE and ECMP hashing.

Same GPUs, NVLink and kernel figures as ``h800_ib``. RoCE v2 headers (Ethernet, IP, UDP, BTH)
are about 50 bytes per 4 KB packet more than InfiniBand's, hence a one-point lower RDMA
efficiency; switches hash every queue pair onto one spine path (ECMP) instead of spraying
packets adaptively. Not calibrated against measurements: use it to compare fabrics.
"""

from dataclasses import replace

from ..hardware import Fabric, Hardware, Nic
from .h800_ib import HARDWARE as _IB

HARDWARE: Hardware = replace(
    _IB,
    name="h800_roce",
    description="8x H800 per node, NVLink ~160 GB/s, 1x CX7 400 GbE RoCE per GPU, "
                "rail-optimized leaf-spine with ECMP",
    nic=Nic("ConnectX-7 RoCE", port_gbps=400.0, efficiency=0.87, latency_us=4.0),
    fabric=Fabric(kind="roce", routing="ecmp", hosts_per_leaf=32, uplinks_per_leaf=32,
                  uplink_gbps=400.0),
)
