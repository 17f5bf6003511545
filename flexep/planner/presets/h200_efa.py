"""AWS p5en: 8x H200, two 200 Gb/s EFA (v3) NICs per GPU.

EFA cannot be driven by the GPU (no IBGDA): a CPU proxy thread posts every RDMA write for the
GPU (UCCL-EP, NVSHMEM's proxy transport, NCCL's net plugin). EFA's SRD transport sprays a flow's
packets over many paths (no ECMP collisions) but does not deliver writes in order. Its small
message latency is several times InfiniBand's (order of 15 us one way).
"""

from .h200_ib import PRESET as _H200

PRESET = {
    **_H200,
    "name": "h200_efa",
    "description": "AWS p5en: 8x H200 per node, NVLink 450 GB/s/dir, 2x 200 Gb/s EFA per GPU, "
                   "CPU-proxy RDMA, SRD multipath (unordered)",
    "nic": {"name": "EFA v3", "port_gbps": 200.0, "nics_per_gpu": 2, "latency_us": 15.0,
            "initiator": "proxy"},
    "fabric": {"kind": "efa", "routing": "spray", "ordered": False, "hosts_per_leaf": 32,
               "uplinks_per_leaf": 32, "uplink_gbps": 400.0},
}
