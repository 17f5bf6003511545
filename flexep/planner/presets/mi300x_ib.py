"""AMD MI300X nodes: 8 GPUs on a full xGMI mesh (7 links of 64 GB/s per direction each),
one ConnectX-7 400 Gb/s NIC per GPU posted through a CPU proxy (no IBGDA on AMD GPUs)."""

PRESET = {
    "name": "mi300x_ib",
    "description": "8x MI300X per node, xGMI full mesh 7x 64 GB/s/dir, 1x CX7 400 Gb/s per GPU, "
                   "CPU-proxy RDMA",
    "gpus_per_node": 8,
    "gpu": {"name": "MI300X", "sms": 304, "hbm_gbs": 5300.0},
    "scale_up": {"name": "xGMI (Infinity Fabric)", "bandwidth_gbs": 448.0, "latency_us": 1.5,
                 "domain_size": 8, "topology": "mesh"},
    "nic": {"name": "ConnectX-7", "port_gbps": 400.0, "latency_us": 2.5, "initiator": "proxy"},
    "fabric": {"kind": "infiniband", "routing": "adaptive", "hosts_per_leaf": 32,
               "uplinks_per_leaf": 32, "uplink_gbps": 400.0},
}
