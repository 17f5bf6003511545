"""AWS p6-b200: 8x B200 (NVLink5), one 400 Gb/s EFA (v4) NIC per GPU, CPU-proxy RDMA."""

from .b200_ib import PRESET as _B200

PRESET = {
    **_B200,
    "name": "b200_efa",
    "description": "AWS p6-b200: 8x B200 per node, NVLink5 900 GB/s/dir, 1x 400 Gb/s EFA per GPU, "
                   "CPU-proxy RDMA, SRD multipath (unordered)",
    "nic": {"name": "EFA v4", "port_gbps": 400.0, "latency_us": 15.0, "initiator": "proxy"},
    "fabric": {"kind": "efa", "routing": "spray", "ordered": False, "hosts_per_leaf": 32,
               "uplinks_per_leaf": 32, "uplink_gbps": 400.0},
}
