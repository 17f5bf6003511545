"""Atlas 800T A2: 8 Ascend 910B NPUs on a full HCCS mesh, one 200 GbE RoCE port per NPU.

HCCS: 7 links per NPU, 392 GB/s bidirectional in all (196 GB/s per direction, 28 per link).
910B: 24 AI cube / 48 vector cores, HBM2e about 1.6 TB/s. RoCE fabric with ECMP.
"""

PRESET = {
    "name": "ascend_910b",
    "description": "Atlas A2: 8x Ascend 910B per node, HCCS full mesh 196 GB/s/dir, "
                   "1x 200 GbE RoCE per NPU, leaf-spine with ECMP",
    "gpus_per_node": 8,
    "gpu": {"name": "Ascend 910B", "sms": 48, "hbm_gbs": 1600.0},
    "scale_up": {"name": "HCCS", "bandwidth_gbs": 196.0, "latency_us": 2.0, "domain_size": 8,
                 "topology": "mesh"},
    "nic": {"name": "RoCE 200GbE", "port_gbps": 200.0, "latency_us": 5.0, "initiator": "gpu"},
    "fabric": {"kind": "roce", "routing": "ecmp", "hosts_per_leaf": 32, "uplinks_per_leaf": 32,
               "uplink_gbps": 200.0},
}
