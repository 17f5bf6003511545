"""The ``h800_ib`` cluster with its network swapped for 400 GbE RoCE and ECMP hashing.

Same GPUs and NVLink; switches hash every queue pair onto one spine path (ECMP) instead of
spraying packets adaptively, and RoCE's switch hops add a little latency.
"""

from .h800_ib import PRESET as _IB

PRESET = {
    **_IB,
    "name": "h800_roce",
    "description": "8x H800 per node, NVLink 200 GB/s/dir, 1x CX7 400 GbE RoCE per GPU, "
                   "rail-optimized leaf-spine with ECMP",
    "nic": {"name": "ConnectX-7 RoCE", "port_gbps": 400.0, "latency_us": 3.5, "initiator": "gpu"},
    "fabric": {"kind": "roce", "routing": "ecmp", "hosts_per_leaf": 32, "uplinks_per_leaf": 32,
               "uplink_gbps": 400.0},
}
