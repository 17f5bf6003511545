"""The planner's API: predicted time and bandwidth per EP size, mode, phase and channel count.

:func:`predict` samples one routing per rank for an EP size, counts its traffic with flexep's
accounting (:mod:`flexep.planner.traffic`), adds the fabric's spine-link term
(:mod:`flexep.planner.ecmp`) and times every phase with the model of
:mod:`flexep.planner.model` for a hardware description and an implementation profile.
:func:`plan` sweeps EP sizes and channel counts.

EP groups fill scale-up domains first: up to ``hw.scale_up.domain_size`` ranks the group is one
domain (no NIC traffic); larger groups must be whole domains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

from ..accounting import routing_flows
from ..topology import Topology
from .ecmp import fabric_time_us
from .hardware import Hardware
from .model import PhaseTime, phase_time
from .profile import Profile, get_profile
from .routing import Routing
from .traffic import MODES, PHASES, Loads, mode_loads
from .workload import ModelShape

__all__ = ["Prediction", "predict", "plan", "topology_for", "phase_loads", "predict_from_loads"]


@dataclass(frozen=True)
class Prediction:
    """One predicted phase.

    Attributes:
        ep, mode, phase, channels: what was predicted (``channels``: flows per peer).
        profile: the implementation profile's name; ``sms``: SMs the call used (0: n/a).
        time_us: predicted time; ``fixed_us`` of it is additive (launch, latency, passes).
        bottleneck: the term that sets the time (``nic_recv``, ``sm_forward``, ``launch``...).
        why: the kinds of cost by share, e.g. ``bandwidth 81% (nic_recv), fixed 12% (launch)``.
        shares: fraction of ``time_us`` per kind (bandwidth, ecmp, sm, issue, fixed, latency,
            compute).
        terms_us: every term's time.
        bandwidth_gbs: ``"rdma"`` and ``"nvl"``: bytes per rank as DeepEP's benchmarks count
            them over ``time_us`` (DeepEP's "bottleneck bandwidth"); ``"nic"``: the busiest
            NIC's actual bytes over ``time_us``.
        bytes_per_rank: the busiest rank's bytes per resource (``nic``, ``scaleup``).
        ecmp_slowdown: fabric term over the NIC term (1.0 when the spine is not the limit).
        ranks_per_node: ranks per scale-up domain of the EP group.
        counted: mean rows per rank as benchmarks count them (see :class:`~.traffic.Loads`).
        row_bytes: bytes of one row (normal) or message (low latency).
    """

    ep: int
    mode: str
    phase: str
    channels: int
    time_us: float
    fixed_us: float
    bottleneck: str
    profile: str = ""
    sms: int = 0
    why: str = ""
    shares: dict = field(default_factory=dict)
    terms_us: dict = field(default_factory=dict)
    bandwidth_gbs: dict = field(default_factory=dict)
    bytes_per_rank: dict = field(default_factory=dict)
    ecmp_slowdown: float = 1.0
    ranks_per_node: int = 8
    counted: dict = field(default_factory=dict)
    row_bytes: float = 0.0

    @property
    def deepep_gbs(self) -> float:
        """Bandwidth as DeepEP's tables report it: NVLink for one domain, RDMA across domains,
        the per-selection bytes for low latency."""
        key = "nvl" if self.mode != "low_latency" and self.ep <= self.ranks_per_node else "rdma"
        return self.bandwidth_gbs[key]

    def as_dict(self) -> dict:
        return {**asdict(self), "deepep_gbs": self.deepep_gbs}


def topology_for(hw: Hardware, ep: int) -> Topology:
    """EP group shape on ``hw``: one scale-up domain up to its size, else whole domains."""
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ValueError(f"EP size must be a positive int, got {ep!r}")
    per_domain = min(ep, hw.domain_size)
    if ep % per_domain:
        raise ValueError(f"EP size {ep} must be a multiple of the scale-up domain size "
                         f"({hw.domain_size}) on {hw.name}")
    return Topology(ep, per_domain)


def phase_loads(hw: Hardware, shape: ModelShape, routing: Routing, ep: int,
                modes: Sequence[str] = MODES, capacity: int = 0, seed: int = 0,
                distinct_tokens: int = 1 << 17) -> dict:
    """``{(mode, phase): Loads}`` for one sampled routing of ``ep`` ranks on ``hw``.

    ``capacity`` > 0 makes the low-latency mode fixed-capacity (flexep): that many rows per peer.
    ``distinct_tokens`` bounds the tokens drawn (ranks beyond reuse earlier ranks' routings,
    see :class:`~.routing.Routing`).
    """
    for m in modes:
        if m not in MODES:
            raise ValueError(f"modes must be drawn from {MODES}, got {m!r}")
    topo = topology_for(hw, ep)
    topk = routing.sample(ep, topo.ranks_per_node, shape.tokens_per_rank, shape.topk,
                          shape.num_experts, seed=seed, max_distinct_tokens=distinct_tokens)
    flows = routing_flows(topk, shape.num_experts, topo)
    server = hw.scale_up.server_size if hw.scale_up.server_size < topo.ranks_per_node else 0
    return {(m, p): mode_loads(flows, topo, shape, m, p, server, capacity if m == "low_latency" else 0)
            for m in modes for p in PHASES}


def _fabric_us(ld: Loads, hw: Hardware, ep: int, channels: int, seed: int, samples: int,
               balanced: bool = False) -> float:
    if not ld.multi_domain or not float(ld.inter_flows.sum()):
        return 0.0
    topo = topology_for(hw, ep)
    return fabric_time_us(ld.inter_flows, topo, hw.fabric, channels, samples=samples, seed=seed,
                          balanced=balanced).mean_us


def predict_from_loads(ld: Loads, hw: Hardware, prof: Profile, shape: ModelShape, channels: int,
                       fabric_us: float = 0.0, sms: Optional[int] = None,
                       explain: bool = True) -> Prediction:
    """The :class:`Prediction` of one phase whose loads (and ECMP term) are already known.

    ``explain=False`` leaves ``why`` and ``shares`` empty (a fit evaluates hundreds of
    thousands of predictions and reads only their times).
    """
    t: PhaseTime = phase_time(ld, hw, prof, shape, fabric_us, sms)
    total = t.total_us
    token = shape.deepep_token_bytes(ld.phase)
    if ld.mode == "low_latency":
        sel = ld.counted["selections"] * ld.row_bytes
        bw = {"rdma": sel / (total * 1e3), "nvl": sel / (total * 1e3)}
    else:
        bw = {"rdma": ld.counted["node_pairs"] * token / (total * 1e3),
              "nvl": ld.counted["recv_rows"] * token / (total * 1e3)}
    bw["nic"] = max(ld.nic_send, ld.nic_recv) / (total * 1e3)
    terms = t.terms_us()
    nic = max(terms.get("nic_send", 0.0), terms.get("nic_recv", 0.0))
    slowdown = max(1.0, terms.get("fabric", 0.0) / nic) if nic > 0 else 1.0
    return Prediction(
        ep=ld.ep, mode=ld.mode, phase=ld.phase, channels=channels, time_us=total,
        fixed_us=t.fixed_us, bottleneck=t.bottleneck, profile=prof.name, sms=t.sms,
        why=t.why() if explain else "", shares=t.shares() if explain else {}, terms_us=terms,
        bandwidth_gbs=bw,
        bytes_per_rank={"nic": max(ld.nic_send, ld.nic_recv), "scaleup": max(ld.su_send, ld.su_recv)},
        ecmp_slowdown=slowdown, ranks_per_node=min(ld.ep, hw.domain_size), counted=dict(ld.counted),
        row_bytes=ld.row_bytes)


def predict(hw: Hardware, shape: ModelShape, routing: Routing, ep: int,
            modes: Sequence[str] = MODES, channels: Sequence[Optional[int]] = (None,),
            profile: Union[str, Profile] = "deepep_v1", sms: Optional[int] = None, seed: int = 0,
            ecmp_samples: int = 32) -> list[Prediction]:
    """Predictions for one EP size, every mode in ``modes`` and channel count in ``channels``,
    both phases, for implementation ``profile`` on ``hw``.

    A channel is one flow (queue pair) per peer, what ECMP hashes; ``None`` = the profile's
    ``qps_per_peer``. ``sms`` overrides the SMs of a normal-mode call.
    """
    prof = get_profile(profile)
    capacity = shape.tokens_per_rank if prof.ll_capacity else 0
    loads = phase_loads(hw, shape, routing, ep, modes, capacity, seed)
    out = []
    for ch in channels:
        c = prof.qps_per_peer if ch is None else ch
        if not isinstance(c, int) or c < 1:
            raise ValueError(f"channels must be ints >= 1, got {ch!r}")
        for mode in modes:
            for phase in PHASES:
                ld = loads[mode, phase]
                fab = _fabric_us(ld, hw, ep, c, seed, ecmp_samples, mode in prof.balanced_modes)
                out.append(predict_from_loads(ld, hw, prof, shape, c, fab, sms))
    return out


def plan(hw: Hardware, shape: ModelShape, routing: Routing, ep_sizes: Sequence[int],
         modes: Sequence[str] = MODES, channels: Sequence[Optional[int]] = (None,),
         profile: Union[str, Profile] = "deepep_v1", sms: Optional[int] = None,
         seed: int = 0) -> list[Prediction]:
    """:func:`predict` for every EP size in ``ep_sizes`` (each sampled once, shared by modes)."""
    out: list[Prediction] = []
    for ep in ep_sizes:
        out += predict(hw, shape, routing, ep, modes, channels, profile, sms, seed)
    return out
