"""Hardware descriptions the planner times traffic on.

A :class:`Hardware` is a frozen tree of small dataclasses, one per thing that moves bytes:

* :class:`IntraLink`: the scale-up link inside a node (NVLink, HCCS), per rank and direction.
* :class:`Nic`: each rank's network attachment (NICs x ports x port speed), with the fraction
  of line rate that RDMA writes actually achieve (``efficiency``: headers, work-request and
  PCIe overheads) and the one-way latency of a small message.
* :class:`Fabric`: the network between nodes: InfiniBand with adaptive routing, or RoCE with
  ECMP hashing, as a two-tier leaf-spine (see :mod:`flexep.planner.ecmp`).
* :class:`Engine`: the communication kernels' own limits: every row a kernel sends, forwards
  or receives is copied by a channel (a pair of SMs in DeepEP), so a kernel with C channels
  copies at most ``C * copy_gbs_per_channel``; launch and notify costs; the issue cost of one
  message (low-latency kernels send one per token and expert).

Units: GB/s are 1e9 bytes per second, Gb/s are 1e9 bits per second, latencies in microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IntraLink", "Nic", "Fabric", "Engine", "Hardware", "FABRIC_KINDS", "FABRIC_ROUTING"]

FABRIC_KINDS = ("infiniband", "roce")
FABRIC_ROUTING = ("adaptive", "ecmp")


def _positive(owner: str, **values: float) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{owner}.{name} must be a positive number, got {v!r}")


def _non_negative(owner: str, **values: float) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{owner}.{name} must be a number >= 0, got {v!r}")


@dataclass(frozen=True)
class IntraLink:
    """Scale-up link of one rank: ``bandwidth_gbs`` per direction, ``latency_us`` per message."""

    name: str
    bandwidth_gbs: float
    latency_us: float

    def __post_init__(self) -> None:
        _positive("IntraLink", bandwidth_gbs=self.bandwidth_gbs)
        _non_negative("IntraLink", latency_us=self.latency_us)


@dataclass(frozen=True)
class Nic:
    """Network attachment of one rank.

    Attributes:
        name: e.g. ``"ConnectX-7"``.
        port_gbps: line rate of one port in Gb/s (400 for NDR / 400GbE).
        ports: ports per NIC used by this rank.
        nics_per_rank: NICs dedicated to one rank (1 on rail-aligned 8-GPU nodes).
        efficiency: RDMA write goodput as a fraction of line rate.
        latency_us: one-way latency of a small message across the fabric.
    """

    name: str
    port_gbps: float
    ports: int = 1
    nics_per_rank: int = 1
    efficiency: float = 0.9
    latency_us: float = 3.0

    def __post_init__(self) -> None:
        _positive("Nic", port_gbps=self.port_gbps, ports=self.ports, nics_per_rank=self.nics_per_rank,
                  efficiency=self.efficiency)
        _non_negative("Nic", latency_us=self.latency_us)
        if self.efficiency > 1:
            raise ValueError(f"Nic.efficiency is a fraction of line rate, must be <= 1, "
                             f"got {self.efficiency}")

    @property
    def line_gbs(self) -> float:
        """Aggregate line rate of the rank in GB/s."""
        return self.port_gbps * self.ports * self.nics_per_rank / 8

    @property
    def goodput_gbs(self) -> float:
        """What RDMA payload actually achieves, in GB/s."""
        return self.line_gbs * self.efficiency


@dataclass(frozen=True)
class Fabric:
    """Two-tier leaf-spine network between the nodes' NICs.

    Attributes:
        kind: ``"infiniband"`` or ``"roce"``.
        routing: ``"adaptive"`` (packets spread over all spine paths: no collisions) or
            ``"ecmp"`` (each flow, i.e. each queue pair, is hashed onto one path).
        hosts_per_leaf: NIC ports under one leaf switch.
        uplinks_per_leaf: equal-cost paths out of a leaf (one per spine).
        uplink_gbps: speed of one uplink in Gb/s.
        rail_optimized: NIC ``p`` of every node sits on rail leaf ``p`` (rail-aligned traffic
            stays under one leaf); otherwise a node's NICs share consecutive leaves.
    """

    kind: str = "infiniband"
    routing: str = "adaptive"
    hosts_per_leaf: int = 32
    uplinks_per_leaf: int = 32
    uplink_gbps: float = 400.0
    rail_optimized: bool = True

    def __post_init__(self) -> None:
        if self.kind not in FABRIC_KINDS:
            raise ValueError(f"Fabric.kind must be one of {FABRIC_KINDS}, got {self.kind!r}")
        if self.routing not in FABRIC_ROUTING:
            raise ValueError(f"Fabric.routing must be one of {FABRIC_ROUTING}, got {self.routing!r}")
        _positive("Fabric", hosts_per_leaf=self.hosts_per_leaf, uplinks_per_leaf=self.uplinks_per_leaf,
                  uplink_gbps=self.uplink_gbps)

    @property
    def uplink_gbs(self) -> float:
        return self.uplink_gbps / 8


@dataclass(frozen=True)
class Engine:
    """Limits of the communication kernels themselves.

    Attributes:
        copy_gbs_per_channel: bytes per second one channel copies (staging, forwarding and
            receiving rows all go through channel copies).
        default_channels: channels used when the plan does not sweep them (DeepEP's tests run
            24 SMs = 12 channels).
        launch_us: fixed cost of one normal-mode call (kernel launch, notify round, host sync).
        ll_launch_us: fixed cost of one low-latency call (launch, count flags, completion wait).
        message_us: issue cost of one message, paid by each rank for the messages it sends,
            serialised with the data: one per (token, expert) in low-latency mode, one per
            (peer, channel) in normal mode.
    """

    copy_gbs_per_channel: float
    default_channels: int = 12
    launch_us: float = 20.0
    ll_launch_us: float = 10.0
    message_us: float = 0.02

    def __post_init__(self) -> None:
        _positive("Engine", copy_gbs_per_channel=self.copy_gbs_per_channel,
                  default_channels=self.default_channels)
        _non_negative("Engine", launch_us=self.launch_us, ll_launch_us=self.ll_launch_us,
                      message_us=self.message_us)


@dataclass(frozen=True)
class Hardware:
    """A cluster the planner predicts for: node shape, links, network and kernel limits."""

    name: str
    description: str
    ranks_per_node: int
    intra: IntraLink
    nic: Nic
    fabric: Fabric
    engine: Engine

    def __post_init__(self) -> None:
        _positive("Hardware", ranks_per_node=self.ranks_per_node)
