"""H800 nodes, NVLink, one ConnectX-7 400 Gb/s InfiniBand NIC per GPU: DeepEP's published setup.

Link figures are DeepEP's ("~160 GB/s NVLink", "CX7 400 Gb/s, ~50 GB/s"). The three kernel
figures (RDMA efficiency, copy rate per channel, message issue cost) are the ones that
reproduce all of DeepEP's V1 tables at once (``flexep plan --calibrate``).
"""

from ..hardware import Engine, Fabric, Hardware, IntraLink, Nic

HARDWARE = Hardware(
    name="h800_ib",
    description="8x H800 per node, NVLink ~160 GB/s, 1x CX7 400 Gb/s InfiniBand per GPU, "
                "rail-optimized leaf-spine with adaptive routing",
    ranks_per_node=8,
    intra=IntraLink("NVLink (H800)", bandwidth_gbs=160.0, latency_us=2.0),
    nic=Nic("ConnectX-7 IB", port_gbps=400.0, efficiency=0.88, latency_us=3.0),
    fabric=Fabric(kind="infiniband", routing="adaptive", hosts_per_leaf=32, uplinks_per_leaf=32,
                  uplink_gbps=400.0),
    engine=Engine(copy_gbs_per_channel=27.0, default_channels=12, launch_us=20.0,
                  ll_launch_us=10.0, message_us=0.02),
)
