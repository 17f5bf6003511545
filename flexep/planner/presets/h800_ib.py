"""H800 nodes, NVLink, one ConnectX-7 400 Gb/s InfiniBand NIC per GPU: DeepEP V1's published setup.

H800 SXM: 132 SMs, 3.35 TB/s HBM3, NVLink 400 GB/s bidirectional (200 GB/s per direction;
DeepEP's README quotes "~160 GB/s" achievable). One CX7 NDR port per GPU, rail-optimised
leaf-spine with adaptive routing.
"""

PRESET = {
    "name": "h800_ib",
    "description": "8x H800 per node, NVLink 200 GB/s/dir, 1x CX7 400 Gb/s InfiniBand per GPU, "
                   "rail-optimized leaf-spine, adaptive routing",
    "gpus_per_node": 8,
    "gpu": {"name": "H800", "sms": 132, "hbm_gbs": 3350.0},
    "scale_up": {"name": "NVLink4 (H800)", "bandwidth_gbs": 200.0, "latency_us": 1.0, "domain_size": 8},
    "nic": {"name": "ConnectX-7 IB", "port_gbps": 400.0, "latency_us": 2.5, "initiator": "gpu"},
    "fabric": {"kind": "infiniband", "routing": "adaptive", "hosts_per_leaf": 32,
               "uplinks_per_leaf": 32, "uplink_gbps": 400.0},
}
