"""B200 nodes (NVLink5 900 GB/s per direction), one ConnectX-7 400 Gb/s InfiniBand NIC per GPU.

B200: 148 SMs, 8 TB/s HBM3e, 18 NVLink5 links = 1.8 TB/s bidirectional. DeepEP V2's "SM100"
rows were measured on B200-class GPUs with CX7 NICs.
"""

PRESET = {
    "name": "b200_ib",
    "description": "8x B200 per node, NVLink5 900 GB/s/dir, 1x CX7 400 Gb/s InfiniBand per GPU, "
                   "rail-optimized leaf-spine, adaptive routing",
    "gpus_per_node": 8,
    "gpu": {"name": "B200", "sms": 148, "hbm_gbs": 8000.0},
    "scale_up": {"name": "NVLink5", "bandwidth_gbs": 900.0, "latency_us": 1.0, "domain_size": 8},
    "nic": {"name": "ConnectX-7 IB", "port_gbps": 400.0, "latency_us": 2.5, "initiator": "gpu"},
    "fabric": {"kind": "infiniband", "routing": "adaptive", "hosts_per_leaf": 32,
               "uplinks_per_leaf": 32, "uplink_gbps": 400.0},
}
