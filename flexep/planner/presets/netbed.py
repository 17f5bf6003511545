"""netbed: an emulated cluster on one Linux box (``shared/tools/netbed``), as the planner sees it.

Each node is a network namespace whose ranks are processes on the host's CPU. Inside a node the
ranks talk over loopback TCP (the "scale-up domain": a few GB/s, tens of microseconds); between
nodes every node has ``paths`` links of ``gbit`` Gbit/s each way, one per switch plane, rate
limited with ``tbf``, shared by all the node's ranks (one address per node, no rails). Each TCP
connection is hashed onto one plane by its 5-tuple (ECMP), so the planner's leaf-spine model
applies with one "leaf" per node (``hosts_per_leaf`` = ranks per node, not rail-optimized) and
one uplink per plane. Kernel TCP moves the bytes (``initiator="host"``).

:data:`PRESET` is the issue's configuration: 2 ranks per node, 2 paths of 0.25 Gbit/s.
:func:`netbed_preset` gives any other (``netbed up --gbit G --paths P`` with K ranks per node).
The CPU-side figures (loopback rate, memory bandwidth, latencies) are estimates for a small
virtual machine, not measurements of a particular one.
"""

from __future__ import annotations

__all__ = ["PRESET", "netbed_preset"]


def netbed_preset(gbit: float = 0.25, paths: int = 2, ranks_per_node: int = 2) -> dict:
    """The preset dict of a netbed testbed with ``paths`` links of ``gbit`` Gbit/s per node and
    ``ranks_per_node`` processes per node. Example: ``netbed_preset(1.0, 1, 1)`` is
    ``netbed up --gbit 1 --paths 1`` run with ``--nproc-per-node 1``."""
    return {
        "name": "netbed",
        "description": f"netbed: {ranks_per_node} rank(s) per node on one host's CPU, loopback inside a "
                       f"node, {paths} path(s) of {gbit:g} Gbit/s per node, ECMP on the TCP 5-tuple",
        "gpus_per_node": ranks_per_node,
        "gpu": {"name": "host CPU core", "sms": 1, "hbm_gbs": 8.0},
        "scale_up": {"name": "loopback TCP", "bandwidth_gbs": 2.0, "latency_us": 30.0,
                     "domain_size": ranks_per_node},
        "nic": {"name": "veth + tbf", "port_gbps": gbit, "ports": paths, "gpus_per_nic": ranks_per_node,
                "latency_us": 60.0, "initiator": "host", "proxy_threads": 1, "proxy_latency_us": 0.0},
        "fabric": {"kind": "ethernet", "routing": "ecmp", "hosts_per_leaf": ranks_per_node,
                   "uplinks_per_leaf": paths, "uplink_gbps": gbit, "rail_optimized": False},
    }


PRESET = netbed_preset()
