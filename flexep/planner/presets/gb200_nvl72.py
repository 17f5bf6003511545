"""GB200 NVL72: 72 B200-class GPUs in one NVLink5 domain (NVSwitch trays), four GPUs per
compute tray, one 400 Gb/s NIC per GPU for traffic between racks."""

PRESET = {
    "name": "gb200_nvl72",
    "description": "GB200 NVL72: 72 GPUs in one NVLink5 switch domain (900 GB/s/dir), 4 per tray, "
                   "1x 400 Gb/s InfiniBand per GPU between racks",
    "gpus_per_node": 4,
    "gpu": {"name": "B200 (GB200)", "sms": 148, "hbm_gbs": 8000.0},
    "scale_up": {"name": "NVLink5 + NVSwitch", "bandwidth_gbs": 900.0, "latency_us": 1.5,
                 "domain_size": 72, "server_size": 4},
    "nic": {"name": "ConnectX-7 IB", "port_gbps": 400.0, "latency_us": 2.5, "initiator": "gpu"},
    "fabric": {"kind": "infiniband", "routing": "adaptive", "hosts_per_leaf": 32,
               "uplinks_per_leaf": 32, "uplink_gbps": 400.0},
}
