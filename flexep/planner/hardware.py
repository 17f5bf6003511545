"""Hardware descriptions: what a cluster's datasheet says, nothing the planner fitted.

A :class:`Hardware` is a frozen tree of small dataclasses, one per thing that moves bytes or
issues work. Every field is a number a user can read off a datasheet or a system description;
how well a given implementation uses the hardware (copy rate per SM, fixed costs, achieved
fraction of line rate) lives in the implementation profile (:mod:`flexep.planner.profile`).

* :class:`Accelerator`: the GPU/NPU: compute units (SMs, CUs, AI cores) and memory bandwidth.
* :class:`ScaleUp`: the load/store domain (NVLink + NVSwitch, xGMI, HCCS, UB): bandwidth per
  GPU and direction, how many GPUs share it (8 on an HGX board, 72 on NVL72, a SuperPoD), its
  topology and latency.
* :class:`Nic`: each GPU's scale-out attachment (NICs x ports x port speed), the latency of a
  small message across the fabric, and who posts RDMA work: the GPU itself (IBGDA/GDAKI), a CPU
  proxy thread (UCCL-EP, NVSHMEM IBRC, NCCL's network proxy) or the host's TCP stack.
* :class:`Fabric`: the network between scale-up domains: InfiniBand with adaptive routing, RoCE
  with ECMP hashing, or a packet-spraying fabric (EFA's SRD), ordered or not, as a two-tier
  leaf-spine (see :mod:`flexep.planner.ecmp`).

Units: GB/s are 1e9 bytes per second, Gb/s are 1e9 bits per second, latencies in microseconds.
The same tree round-trips through plain dicts (:meth:`Hardware.from_dict`, :meth:`Hardware.to_dict`),
which is the preset format documented in ``docs/planner.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

__all__ = ["Accelerator", "ScaleUp", "Nic", "Fabric", "Hardware", "IntraLink", "FABRIC_KINDS",
           "FABRIC_ROUTING", "INITIATORS", "SCALEUP_TOPOLOGIES"]

FABRIC_KINDS = ("infiniband", "roce", "efa", "ethernet")
FABRIC_ROUTING = ("adaptive", "ecmp", "spray")
INITIATORS = ("gpu", "proxy", "host")
SCALEUP_TOPOLOGIES = ("switch", "mesh")


def _positive(owner: str, **values: float) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{owner}.{name} must be a positive number, got {v!r}")


def _non_negative(owner: str, **values: float) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{owner}.{name} must be a number >= 0, got {v!r}")


def _choice(owner: str, name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class Accelerator:
    """One GPU or NPU.

    Attributes:
        name: e.g. ``"H800"``.
        sms: compute units a communication kernel may occupy (SMs, CUs, AI vector cores).
        hbm_gbs: memory bandwidth in GB/s; bounds the passes an implementation runs as
            separate memory-bound kernels (flexep's reorder, reduction and casts).
    """

    name: str = "GPU"
    sms: int = 132
    hbm_gbs: float = 3350.0

    def __post_init__(self) -> None:
        _positive("Accelerator", sms=self.sms, hbm_gbs=self.hbm_gbs)


@dataclass(frozen=True)
class ScaleUp:
    """The scale-up (load/store) domain of one GPU.

    Attributes:
        name: e.g. ``"NVLink4"``.
        bandwidth_gbs: the GPU's scale-up bandwidth per direction in GB/s, datasheet value
            (H800 200, H100/H200 450, B200 900: half the "bidirectional" figure).
        latency_us: one-way latency of a small store to a peer.
        domain_size: GPUs that reach each other over it (8 on an HGX board, 72 on NVL72, the
            dies of a SuperPoD). EP groups up to this size never touch the NIC.
        topology: ``"switch"`` (a switch tier: any peer at the GPU's full rate) or ``"mesh"``
            (point-to-point links: each peer has ``bandwidth_gbs / (domain_size - 1)``).
        server_size: GPUs per server inside the domain (default: the whole domain).
        cross_server_gbs: per-GPU bandwidth to GPUs of other servers in the domain, when the
            domain's second tier is thinner than the first (default: ``bandwidth_gbs``).
    """

    name: str = "NVLink"
    bandwidth_gbs: float = 450.0
    latency_us: float = 1.0
    domain_size: int = 8
    topology: str = "switch"
    server_size: int = 0
    cross_server_gbs: float = 0.0

    def __post_init__(self) -> None:
        _positive("ScaleUp", bandwidth_gbs=self.bandwidth_gbs, domain_size=self.domain_size)
        _non_negative("ScaleUp", latency_us=self.latency_us, server_size=self.server_size,
                      cross_server_gbs=self.cross_server_gbs)
        _choice("ScaleUp", "topology", self.topology, SCALEUP_TOPOLOGIES)
        if self.server_size and self.domain_size % self.server_size:
            raise ValueError(f"ScaleUp.server_size ({self.server_size}) must divide domain_size "
                             f"({self.domain_size})")

    @property
    def gpus_per_server(self) -> int:
        return self.server_size or self.domain_size

    @property
    def cross_gbs(self) -> float:
        """Per-GPU bandwidth to other servers of the domain, GB/s."""
        return self.cross_server_gbs or self.bandwidth_gbs


IntraLink = ScaleUp  # earlier name of the scale-up link


@dataclass(frozen=True)
class Nic:
    """Scale-out attachment of one GPU.

    Attributes:
        name: e.g. ``"ConnectX-7"``.
        port_gbps: line rate of one port in Gb/s (400 for NDR / 400GbE, 200 for EFAv3).
        ports: ports per NIC used by this GPU.
        nics_per_gpu: NICs dedicated to one GPU (2 on p5en, 1 on rail-aligned HGX nodes).
        gpus_per_nic: ranks sharing one NIC (1 on HGX nodes; all of a node's ranks when the
            node has a single uplink, as on an emulated TCP testbed).
        latency_us: one-way latency of a small message across the fabric.
        initiator: who posts RDMA work requests: ``"gpu"`` (IBGDA, NCCL GIN GDAKI), ``"proxy"``
            (a CPU thread posts them for the GPU: UCCL-EP, NVSHMEM IBRC, NCCL's net proxy) or
            ``"host"`` (kernel TCP: Gloo).
        proxy_threads: CPU threads posting for one GPU (``"proxy"``/``"host"`` only; UCCL-EP
            runs 4, NVSHMEM's IBRC transport 1). What one post costs is the implementation's
            (``Profile.proxy_message_us``).
        proxy_latency_us: extra one-way delay of the GPU-to-CPU hand-off (a queue poll).
    """

    name: str = "NIC"
    port_gbps: float = 400.0
    ports: int = 1
    nics_per_gpu: int = 1
    gpus_per_nic: int = 1
    latency_us: float = 3.0
    initiator: str = "gpu"
    proxy_threads: int = 4
    proxy_latency_us: float = 3.0

    def __post_init__(self) -> None:
        _positive("Nic", port_gbps=self.port_gbps, ports=self.ports, nics_per_gpu=self.nics_per_gpu,
                  gpus_per_nic=self.gpus_per_nic, proxy_threads=self.proxy_threads)
        if self.nics_per_gpu > 1 and self.gpus_per_nic > 1:
            raise ValueError(f"Nic: give nics_per_gpu ({self.nics_per_gpu}) or gpus_per_nic "
                             f"({self.gpus_per_nic}), not both above 1")
        _non_negative("Nic", latency_us=self.latency_us, proxy_latency_us=self.proxy_latency_us)
        _choice("Nic", "initiator", self.initiator, INITIATORS)

    @property
    def line_gbs(self) -> float:
        """Line rate available to one GPU in GB/s (its share when GPUs share a NIC)."""
        return self.port_gbps * self.ports * self.nics_per_gpu / self.gpus_per_nic / 8


@dataclass(frozen=True)
class Fabric:
    """Two-tier leaf-spine network between the scale-up domains' NICs.

    Attributes:
        kind: ``"infiniband"``, ``"roce"``, ``"efa"`` or ``"ethernet"`` (TCP).
        routing: ``"adaptive"`` (switches spread packets over all spine paths), ``"ecmp"``
            (each flow, i.e. queue pair or TCP connection, is hashed onto one path) or
            ``"spray"`` (the NIC sprays one flow's packets over many paths, as EFA's SRD).
        ordered: writes of one queue pair land in order (InfiniBand, RoCE). EFA's SRD does
            not: a completion flag cannot follow its data on the same queue pair, so a sender
            waits for the data's completion (one round trip) before signalling.
        hosts_per_leaf: NIC ports under one leaf switch.
        uplinks_per_leaf: equal-cost paths out of a leaf (one per spine).
        uplink_gbps: speed of one uplink in Gb/s.
        rail_optimized: NIC ``p`` of every node sits on rail leaf ``p`` (rail-aligned traffic
            stays under one leaf); otherwise a node's NICs share consecutive leaves.
    """

    kind: str = "infiniband"
    routing: str = "adaptive"
    ordered: bool = True
    hosts_per_leaf: int = 32
    uplinks_per_leaf: int = 32
    uplink_gbps: float = 400.0
    rail_optimized: bool = True

    def __post_init__(self) -> None:
        _choice("Fabric", "kind", self.kind, FABRIC_KINDS)
        _choice("Fabric", "routing", self.routing, FABRIC_ROUTING)
        _positive("Fabric", hosts_per_leaf=self.hosts_per_leaf, uplinks_per_leaf=self.uplinks_per_leaf,
                  uplink_gbps=self.uplink_gbps)

    @property
    def uplink_gbs(self) -> float:
        return self.uplink_gbps / 8


_PARTS = {"gpu": Accelerator, "scale_up": ScaleUp, "nic": Nic, "fabric": Fabric}


@dataclass(frozen=True)
class Hardware:
    """A cluster the planner predicts for.

    Attributes:
        name, description: how it is listed.
        gpus_per_node: GPUs (EP ranks) per server; with one NIC rail per GPU.
        gpu, scale_up, nic, fabric: the parts (see their docstrings).
    """

    name: str
    description: str
    gpus_per_node: int
    gpu: Accelerator = field(default_factory=Accelerator)
    scale_up: ScaleUp = field(default_factory=ScaleUp)
    nic: Nic = field(default_factory=Nic)
    fabric: Fabric = field(default_factory=Fabric)

    def __post_init__(self) -> None:
        _positive("Hardware", gpus_per_node=self.gpus_per_node)
        for key, cls in _PARTS.items():
            if not isinstance(getattr(self, key), cls):
                raise TypeError(f"Hardware.{key} must be a {cls.__name__}, got "
                                f"{type(getattr(self, key)).__name__}")

    @property
    def ranks_per_node(self) -> int:
        """Alias of ``gpus_per_node`` (one EP rank per GPU)."""
        return self.gpus_per_node

    @property
    def domain_size(self) -> int:
        """GPUs of one scale-up domain (at least one server's worth)."""
        return max(self.scale_up.domain_size, 1)

    def to_dict(self) -> dict:
        """Plain-dict form (the preset format); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Hardware:
        """Build from the preset format: top-level ``name``, ``description``,
        ``gpus_per_node`` and one dict per part (``gpu``, ``scale_up``, ``nic``, ``fabric``)
        whose keys are the part's fields. Unknown keys are errors (a typo must not fall back
        to a default silently); missing ones take the field's default."""
        if not isinstance(data, dict):
            raise TypeError(f"a hardware preset must be a dict, got {type(data).__name__}")
        top = {"name", "description", "gpus_per_node", *_PARTS}
        unknown = sorted(set(data) - top)
        if unknown:
            raise ValueError(f"unknown hardware key(s) {unknown}; expected {sorted(top)}")
        kwargs = {k: data[k] for k in ("name", "description", "gpus_per_node") if k in data}
        missing = [k for k in ("name", "gpus_per_node") if k not in data]
        if missing:
            raise ValueError(f"hardware preset needs {missing}")
        kwargs.setdefault("description", kwargs["name"])
        for key, part in _PARTS.items():
            sub = data.get(key, {})
            if not isinstance(sub, dict):
                raise TypeError(f"hardware '{key}' must be a dict of fields, got {type(sub).__name__}")
            names = {f.name for f in fields(part)}
            bad = sorted(set(sub) - names)
            if bad:
                raise ValueError(f"unknown {key} key(s) {bad}; {part.__name__} has {sorted(names)}")
            kwargs[key] = part(**sub)
        return cls(**kwargs)
