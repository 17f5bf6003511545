"""H100 SXM nodes (NVLink4 450 GB/s per direction), one ConnectX-7 400 Gb/s InfiniBand NIC per GPU.

H100 SXM: 132 SMs, 3.35 TB/s HBM3, 18 NVLink4 links = 900 GB/s bidirectional. The calibration
reads DeepEP V2's "SM90 + CX7" rows on this preset (see ``docs/planner.md``).
"""

PRESET = {
    "name": "h100_ib",
    "description": "8x H100 SXM per node, NVLink 450 GB/s/dir, 1x CX7 400 Gb/s InfiniBand per GPU, "
                   "rail-optimized leaf-spine, adaptive routing",
    "gpus_per_node": 8,
    "gpu": {"name": "H100 SXM", "sms": 132, "hbm_gbs": 3350.0},
    "scale_up": {"name": "NVLink4", "bandwidth_gbs": 450.0, "latency_us": 1.0, "domain_size": 8},
    "nic": {"name": "ConnectX-7 IB", "port_gbps": 400.0, "latency_us": 2.5, "initiator": "gpu"},
    "fabric": {"kind": "infiniband", "routing": "adaptive", "hosts_per_leaf": 32,
               "uplinks_per_leaf": 32, "uplink_gbps": 400.0},
}
