"""Atlas 900 A3 SuperPoD (CloudMatrix384): 384 Ascend 910C NPUs = 768 dies in one scale-up domain.

An EP rank is one die ("Ascend AI processor" in Huawei's scheduling docs): two dies form a
910C package, 16 dies a server, 48 servers a SuperPoD joined by the Unified Bus (HCCS L1 on the
board, L2 switches between servers, non-blocking). Each 910C has 392 GB/s of unidirectional UB
bandwidth, 196 GB/s per die; each NPU also has 400 Gb/s of RoCE for traffic leaving the pod
(200 Gb/s per die). HBM 3.2 TB/s per package.
"""

PRESET = {
    "name": "ascend_a3_superpod",
    "description": "Atlas 900 A3 SuperPoD: 768 910C dies in one UB domain (196 GB/s/dir per die, "
                   "16 dies per server), 200 Gb/s RoCE per die between pods",
    "gpus_per_node": 16,
    "gpu": {"name": "Ascend 910C die", "sms": 48, "hbm_gbs": 1600.0},
    "scale_up": {"name": "HCCS/UB", "bandwidth_gbs": 196.0, "latency_us": 2.0, "domain_size": 768,
                 "server_size": 16},
    "nic": {"name": "RoCE 400GbE (per NPU)", "port_gbps": 200.0, "latency_us": 5.0, "initiator": "gpu"},
    "fabric": {"kind": "roce", "routing": "ecmp", "hosts_per_leaf": 32, "uplinks_per_leaf": 32,
               "uplink_gbps": 400.0},
}
