"""Ascend-style node: 8 NPUs on a full HCCS mesh, one 200 GbE RoCE port per NPU.

Illustrative, not calibrated: the HCCS figure (~157 GB/s per NPU and direction, achievable)
is an assumption, the NIC a 200 GbE port at the RoCE efficiency of ``h800_roce``, on an ECMP
fabric. The kernel figures (copy rate per channel, launch, message cost) are assumptions of
the same order as the H800 calibration; replace them with measured values before relying on
absolute numbers.
"""

from ..hardware import Engine, Fabric, Hardware, IntraLink, Nic

HARDWARE = Hardware(
    name="ascend_910b",
    description="8x Ascend 910B-class NPUs per node, HCCS mesh, 1x 200 GbE RoCE per NPU, "
                "leaf-spine with ECMP (illustrative)",
    ranks_per_node=8,
    intra=IntraLink("HCCS", bandwidth_gbs=157.0, latency_us=3.0),
    nic=Nic("RoCE 200GbE", port_gbps=200.0, efficiency=0.87, latency_us=5.0),
    fabric=Fabric(kind="roce", routing="ecmp", hosts_per_leaf=32, uplinks_per_leaf=32,
                  uplink_gbps=200.0),
    engine=Engine(copy_gbs_per_channel=20.0, default_channels=12, launch_us=30.0,
                  ll_launch_us=15.0, message_us=0.03),
)
