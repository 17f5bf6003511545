"""The planner's API: predicted time and bandwidth per EP size, mode, phase and channel count.

:func:`predict` samples one routing per rank for an EP size, counts its traffic with flexep's
accounting (:mod:`flexep.planner.traffic`), adds the fabric's spine-link term
(:mod:`flexep.planner.ecmp`) and times every phase with the link model
(:mod:`flexep.planner.linkmodel`). :func:`plan` sweeps EP sizes and channel counts.

Fixed costs: a normal call pays ``engine.launch_us`` plus one latency per hop (NVLink inside a
node, the network across nodes, both for the hierarchical two-hop path); a low-latency call
pays ``engine.ll_launch_us`` plus one hop latency.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from ..accounting import routing_flows
from ..topology import Topology
from .ecmp import fabric_time_us
from .hardware import Hardware
from .linkmodel import phase_time
from .routing import Routing
from .traffic import MODES, PHASES, mode_loads
from .workload import ModelShape

__all__ = ["Prediction", "predict", "plan", "topology_for"]


@dataclass(frozen=True)
class Prediction:
    """One predicted phase.

    Attributes:
        ep, mode, phase, channels, copy_channels: what was predicted.
        time_us: predicted time; ``fixed_us`` of it is launch and latency.
        bottleneck: resource that sets the time (``nic_recv``, ``copy``, ``fabric``...).
        terms_us: every resource's time on its slowest rank.
        bandwidth_gbs: ``"rdma"`` and ``"nvl"``: bytes per rank as DeepEP's benchmarks count
            them over ``time_us`` (DeepEP's "bottleneck bandwidth"); ``"nic"``: the busiest
            NIC's actual bytes over ``time_us``.
        bytes_per_rank: mean bytes one rank sends per resource (``nic``, ``intra``, ``copy``).
        ecmp_slowdown: fabric term over the NIC term (1.0 when the spine is not the limit).
        ranks_per_node: ranks per node of the EP group.
    """

    ep: int
    mode: str
    phase: str
    channels: int
    copy_channels: int
    time_us: float
    fixed_us: float
    bottleneck: str
    terms_us: dict = field(default_factory=dict)
    bandwidth_gbs: dict = field(default_factory=dict)
    bytes_per_rank: dict = field(default_factory=dict)
    ecmp_slowdown: float = 1.0
    ranks_per_node: int = 8

    @property
    def deepep_gbs(self) -> float:
        """Bandwidth as DeepEP's tables report it: NVLink for one node, RDMA across nodes, the
        per-selection bytes for low latency."""
        key = "nvl" if self.mode != "low_latency" and self.ep <= self.ranks_per_node else "rdma"
        return self.bandwidth_gbs[key]

    def as_dict(self) -> dict:
        return {**asdict(self), "deepep_gbs": self.deepep_gbs}


def topology_for(hw: Hardware, ep: int) -> Topology:
    """EP group shape on ``hw``: full nodes of ``hw.ranks_per_node`` ranks, or one partial node."""
    if not isinstance(ep, int) or ep < 1:
        raise ValueError(f"EP size must be a positive int, got {ep!r}")
    per_node = min(ep, hw.ranks_per_node)
    if ep % per_node:
        raise ValueError(f"EP size {ep} must be a multiple of ranks_per_node ({hw.ranks_per_node}) "
                         f"on {hw.name}")
    return Topology(ep, per_node)


def _fixed_us(hw: Hardware, topo: Topology, mode: str) -> float:
    hop = hw.nic.latency_us if topo.is_multi_node else hw.intra.latency_us
    if mode == "low_latency":
        return hw.engine.ll_launch_us + hop
    if mode == "hierarchical" and topo.is_multi_node:
        hop += hw.intra.latency_us
    return hw.engine.launch_us + hop


def predict(hw: Hardware, shape: ModelShape, routing: Routing, ep: int,
            modes: Sequence[str] = MODES, channels: Sequence[Optional[int]] = (None,),
            copy_channels: Optional[int] = None, seed: int = 0,
            ecmp_samples: int = 32) -> list[Prediction]:
    """Predictions for one EP size, every mode in ``modes`` and channel count in ``channels``,
    both phases.

    A channel is one flow (queue pair) per peer and, as in DeepEP, one copy unit of the kernel:
    ``channels`` sets both. ``copy_channels`` pins the kernel's copy units instead (e.g. to
    isolate the fabric's response to more flows per peer). ``None`` channels = the hardware's
    ``engine.default_channels``.
    """
    for m in modes:
        if m not in MODES:
            raise ValueError(f"modes must be drawn from {MODES}, got {m!r}")
    topo = topology_for(hw, ep)
    topk = routing.sample(ep, topo.ranks_per_node, shape.tokens_per_rank, shape.topk,
                          shape.num_experts, seed=seed)
    flows = routing_flows(topk, shape.num_experts, topo)
    out = []
    for ch in channels:
        c = hw.engine.default_channels if ch is None else ch
        for mode in modes:
            for phase in PHASES:
                out.append(_predict_phase(hw, topo, shape, flows, mode, phase, c,
                                          copy_channels or c, seed, ecmp_samples))
    return out


def _predict_phase(hw, topo, shape, flows, mode, phase, channels, copy_channels, seed,
                   samples) -> Prediction:
    loads = mode_loads(flows, topo, shape, mode, phase, channels)
    rates = {"nic_send": hw.nic.goodput_gbs, "nic_recv": hw.nic.goodput_gbs,
             "intra_send": hw.intra.bandwidth_gbs, "intra_recv": hw.intra.bandwidth_gbs,
             "copy": copy_channels * hw.engine.copy_gbs_per_channel}
    per_rank = {"nic_send": loads.nic_send, "nic_recv": loads.nic_recv,
                "intra_send": loads.intra_send, "intra_recv": loads.intra_recv}
    if mode != "low_latency":  # low-latency kernels use every SM: no channel copy limit
        per_rank["copy"] = loads.copy
    shared = {}
    if topo.is_multi_node:
        shared["fabric"] = fabric_time_us(loads.inter_flows, topo, hw.fabric, channels,
                                          samples=samples, seed=seed).mean_us
    t = phase_time(per_rank, rates, _fixed_us(hw, topo, mode), loads.messages, hw.engine.message_us,
                   shared)
    nic = max(t.terms_us["nic_send"], t.terms_us["nic_recv"])
    slowdown = max(1.0, shared.get("fabric", 0.0) / nic) if nic > 0 else 1.0
    bw = {k: float(v.mean()) / (t.total_us * 1e3) for k, v in loads.counted.items()}
    bw["nic"] = float(max(loads.nic_send.max(), loads.nic_recv.max())) / (t.total_us * 1e3)
    return Prediction(
        ep=topo.world_size, mode=mode, phase=phase, channels=channels,
        copy_channels=copy_channels, time_us=t.total_us,
        fixed_us=t.fixed_us, bottleneck=t.bottleneck, terms_us=t.terms_us, bandwidth_gbs=bw,
        bytes_per_rank={"nic": float(loads.nic_send.mean()), "intra": float(loads.intra_send.mean()),
                        "copy": float(loads.copy.mean())},
        ecmp_slowdown=slowdown, ranks_per_node=topo.ranks_per_node)


def plan(hw: Hardware, shape: ModelShape, routing: Routing, ep_sizes: Sequence[int],
         modes: Sequence[str] = MODES, channels: Sequence[Optional[int]] = (None,),
         copy_channels: Optional[int] = None, seed: int = 0) -> list[Prediction]:
    """:func:`predict` for every EP size in ``ep_sizes`` (each sampled once, shared by modes)."""
    out: list[Prediction] = []
    for ep in ep_sizes:
        out += predict(hw, shape, routing, ep, modes, channels, copy_channels, seed)
    return out
