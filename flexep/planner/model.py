"""The time model: one phase's time from its loads, the hardware and the implementation profile.

A phase's time is a sum of additive terms (fixed costs, latencies, passes that run alone) plus
the largest of the overlapped terms (resources the kernels keep busy at the same time)::

    t = sum(additive terms) + max(overlapped terms)

Every term has a name and a kind, so a prediction can say what dominates it:

* ``bandwidth``: bytes over a link at its achieved rate: scale-up out/in
  (``bandwidth_gbs * scaleup_efficiency``), a mesh link to one peer, the thinner tier of a
  two-tier domain, NIC out/in (``line rate * rdma_efficiency``);
* ``ecmp``: the most loaded spine link after ECMP hashing (:mod:`flexep.planner.ecmp`);
* ``sm``: bytes the call's SMs copy at ``sm_copy_gbs`` / ``sm_forward_gbs`` each, split into
  the roles the implementation gives its SMs (see :mod:`flexep.planner.profile`), and the
  low-latency work of one local expert (``ll_token_us`` per token, serial per expert);
* ``issue``: messages posted by the GPU or, with a proxy-initiated NIC, by CPU threads;
* ``fixed``: launch, per-peer costs, host reads;
* ``latency``: one-way hops (scale-up, network, proxy hand-off) and, on an unordered fabric,
  the round trip a sender waits before it may signal;
* ``compute``: memory-bound passes run as separate kernels (reorders, reductions, casts).

Example: two overlapped terms of 40 and 25 us and a 20 us launch give 60 us; the launch is
a third of the time and the 40 us term is the bottleneck.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .hardware import Hardware
from .profile import Profile
from .traffic import Loads
from .workload import ModelShape

__all__ = ["Term", "PhaseTime", "phase_time", "us", "v2_num_sms", "KINDS"]

KINDS = ("bandwidth", "ecmp", "sm", "issue", "fixed", "latency", "compute")
_HBM_EFFICIENCY = 0.8  # fraction of the HBM datasheet rate a streaming kernel reaches


def us(nbytes: float, gbs: float) -> float:
    """Microseconds to move ``nbytes`` at ``gbs`` GB/s (1 GB/s = 1e3 bytes per us)."""
    return nbytes / (gbs * 1e3)


@dataclass(frozen=True)
class Term:
    """One contribution: ``us`` of kind ``kind``; ``overlapped`` terms compete in the max."""

    name: str
    kind: str
    us: float
    overlapped: bool


@dataclass(frozen=True)
class PhaseTime:
    """Predicted time of one phase and the terms it is made of."""

    total_us: float
    terms: tuple
    sms: int = 0

    @property
    def bottleneck(self) -> str:
        """The overlapped term that sets the pace (or the largest additive one if bigger)."""
        over = [t for t in self.terms if t.overlapped]
        add = [t for t in self.terms if not t.overlapped]
        top = max(over, key=lambda t: t.us, default=None)
        big = max(add, key=lambda t: t.us, default=None)
        if top is None or (big is not None and big.us > top.us):
            return big.name if big else ""
        return top.name

    @property
    def fixed_us(self) -> float:
        return sum(t.us for t in self.terms if not t.overlapped)

    def terms_us(self) -> dict:
        """Every term's time by name."""
        return {t.name: t.us for t in self.terms}

    def shares(self) -> dict:
        """Fraction of the total per kind: additive terms count fully, the overlapped ones
        only through the bottleneck (the others are hidden under it)."""
        out = {k: 0.0 for k in KINDS}
        over = [t for t in self.terms if t.overlapped]
        if over:
            top = max(over, key=lambda t: t.us)
            out[top.kind] += top.us
        for t in self.terms:
            if not t.overlapped:
                out[t.kind] += t.us
        total = self.total_us or 1.0
        return {k: v / total for k, v in out.items() if v > 0}

    def why(self) -> str:
        """One line: kinds by share, each with its largest term, e.g.
        ``bandwidth 81% (nic_recv), fixed 12% (launch), latency 7% (network)``."""
        parts = []
        for kind, share in sorted(self.shares().items(), key=lambda kv: -kv[1]):
            cands = [t for t in self.terms if t.kind == kind]
            name = max(cands, key=lambda t: t.us).name
            parts.append(f"{kind} {share * 100:.0f}% ({name})")
        return ", ".join(parts)


def v2_num_sms(pushed_bytes: float, link_us: float, sm_gbs: float, available: int) -> int:
    """DeepEP V2's analytic SM count: enough SMs to keep the bounding link busy, with 25%
    headroom, even, at least 4, at most the GPU's. Example: 300 MB over a 500 us link at 25 GB/s
    per SM needs 24 SMs, 30 with headroom."""
    if link_us <= 0:
        return min(4, available)
    need = 1.25 * pushed_bytes / (sm_gbs * 1e3 * link_us)
    return int(min(available, max(4, 2 * math.ceil(need / 2))))


def _link_terms(ld: Loads, hw: Hardware, prof: Profile, fabric_us: float) -> list:
    su = hw.scale_up
    r_su = su.bandwidth_gbs * prof.scaleup_efficiency
    out = [Term("scaleup_send", "bandwidth", us(ld.su_send, r_su), True),
           Term("scaleup_recv", "bandwidth", us(ld.su_recv, r_su), True)]
    if su.topology == "mesh" and su.domain_size > 1:
        per_link = su.bandwidth_gbs / (su.domain_size - 1) * prof.scaleup_efficiency
        out.append(Term("scaleup_pair", "bandwidth", us(ld.su_pair, per_link), True))
    if ld.su_cross and su.cross_server_gbs:
        cross = su.cross_gbs * prof.scaleup_efficiency
        out.append(Term("scaleup_cross", "bandwidth", us(ld.su_cross, cross), True))
    if ld.multi_domain:
        r_nic = hw.nic.line_gbs * prof.rdma_efficiency
        out += [Term("nic_send", "bandwidth", us(ld.nic_send, r_nic), True),
                Term("nic_recv", "bandwidth", us(ld.nic_recv, r_nic), True)]
        if fabric_us:
            out.append(Term("fabric", "ecmp", fabric_us / prof.rdma_efficiency, True))
    return out


def _latency_terms(ld: Loads, hw: Hardware, hierarchical: bool) -> list:
    if not ld.multi_domain:
        return [Term("scaleup_hop", "latency", hw.scale_up.latency_us, False)]
    out = [Term("network_hop", "latency", hw.nic.latency_us, False)]
    if hierarchical:
        out.append(Term("scaleup_hop", "latency", hw.scale_up.latency_us, False))
    if hw.nic.initiator != "gpu":
        out.append(Term("proxy_handoff", "latency", hw.nic.proxy_latency_us, False))
    if not hw.fabric.ordered:
        out.append(Term("completion_wait", "latency", 2 * hw.nic.latency_us, False))
    return out


def _proxy_term(hw: Hardware, prof: Profile, messages: float) -> list:
    """CPU threads posting ``messages`` network writes for one GPU."""
    if hw.nic.initiator == "gpu" or messages <= 0:
        return []
    return [Term("proxy_post", "issue", messages * prof.proxy_message_us / hw.nic.proxy_threads, True)]


def _normal_deepep(ld: Loads, hw: Hardware, prof: Profile, fabric_us: float,
                   sms: Optional[int]) -> tuple:
    rb = ld.row_bytes
    hierarchical = ld.mode == "hierarchical" and ld.multi_domain
    terms = _link_terms(ld, hw, prof, fabric_us)
    if prof.family == "deepep_v2":
        # Hybrid: RDMA writes read the staged rows directly (GIN puts); the SMs forward arrivals.
        pushed = (ld.rows_forward if hierarchical else ld.rows_send) * rb
        if not sms:
            link = max((t.us for t in terms), default=0.0)
            sms = v2_num_sms(pushed, link, prof.sm_copy_gbs, hw.gpu.sms)
        terms.append(Term("sm_push", "sm", us(pushed, sms * prof.sm_copy_gbs), True))
    else:
        sms = sms or prof.sms
        half = max(sms // 2, 1)
        if hierarchical:
            rate = half * prof.sm_forward_gbs
            terms += [Term("sm_stage_recv", "sm", us(ld.rows_stage_recv * rb, rate), True),
                      Term("sm_forward", "sm", us(ld.rows_forward * rb, rate), True)]
        else:
            terms += [Term("sm_send", "sm", us(ld.rows_send * rb, half * prof.sm_copy_gbs), True),
                      Term("sm_recv", "sm", us(ld.rows_recv * rb, half * prof.sm_copy_gbs), True)]
    # A proxy posts one write per chunk of rows and one tail update after it.
    net_rows = max(ld.nic_send, ld.nic_recv) / rb if rb else 0.0
    chunk = prof.combine_chunk_rows if ld.phase == "combine" else prof.chunk_rows
    terms += _proxy_term(hw, prof, 2 * net_rows / chunk)
    terms += [Term("launch", "fixed", prof.launch_us, False),
              Term("peers", "fixed", prof.peer_us * (ld.su_peers + ld.net_peers), False)]
    terms += _latency_terms(ld, hw, hierarchical)
    return terms, sms


def _normal_flexep(ld: Loads, hw: Hardware, prof: Profile, shape: ModelShape, fabric_us: float,
                   sms: Optional[int]) -> tuple:
    """flexep: collectives per hop, one after the other, plus separate memory passes."""
    sms = sms or prof.sms
    rb = ld.row_bytes
    links = _link_terms(ld, hw, prof, fabric_us)
    hierarchical = ld.mode == "hierarchical" and ld.multi_domain
    rate = sms * prof.sm_copy_gbs  # NCCL's channels copy what they send and what they receive
    if hierarchical:  # the network all-to-all finishes before the forward one starts
        net = max([t.us for t in links if t.name.startswith(("nic", "fabric"))]
                  + [us(2 * ld.rows_stage * rb, rate)])
        fwd = max([t.us for t in links if t.name.startswith("scaleup")]
                  + [us(2 * ld.rows_forward * rb, rate)])
        terms = [Term("network_a2a", "bandwidth", net, False), Term("forward_a2a", "bandwidth", fwd, False)]
    else:
        terms = links + [Term("sm_copy", "sm", us(ld.rows_send_recv * rb, rate), True)]
    hbm = hw.gpu.hbm_gbs * _HBM_EFFICIENCY
    terms.append(Term("memory_passes", "compute",
                      us(prof.memory_passes * ld.rows_send_recv * rb, hbm), False))
    if ld.phase == "dispatch" and shape.quantized and prof.cast_passes:
        terms.append(Term("cast", "compute",
                          us(prof.cast_passes * shape.tokens_per_rank * shape.hidden * 2, hbm), False))
    if ld.phase == "dispatch":
        terms.append(Term("host_read", "fixed", prof.host_sync_us * (2 if hierarchical else 1), False))
    net_rows = max(ld.nic_send, ld.nic_recv) / rb if rb else 0.0
    chunk = prof.combine_chunk_rows if ld.phase == "combine" else prof.chunk_rows
    terms += _proxy_term(hw, prof, 2 * net_rows / chunk)
    terms += [Term("launch", "fixed", prof.launch_us * (2 if hierarchical else 1), False),
              Term("peers", "fixed", prof.peer_us * (ld.su_peers + ld.net_peers), False)]
    terms += _latency_terms(ld, hw, hierarchical)
    return terms, sms


def _low_latency(ld: Loads, hw: Hardware, prof: Profile, shape: ModelShape, fabric_us: float) -> list:
    terms = _link_terms(ld, hw, prof, fabric_us)
    if prof.ll_capacity:  # one all-to-all of fixed-size blocks, then memory passes
        hbm = hw.gpu.hbm_gbs * _HBM_EFFICIENCY
        copy = us(ld.rows_send_recv * ld.row_bytes, prof.sms * prof.sm_copy_gbs)
        terms += [Term("sm_copy", "sm", copy, True),
                  Term("memory_passes", "compute",
                       us(prof.memory_passes * ld.rows_send_recv * ld.row_bytes, hbm), False),
                  Term("peers", "fixed", prof.peer_us * (ld.su_peers + ld.net_peers), False)]
        if ld.phase == "dispatch" and shape.quantized and prof.cast_passes:
            terms.append(Term("cast", "compute",
                              us(prof.cast_passes * shape.tokens_per_rank * shape.hidden * 2, hbm), False))
        terms += _proxy_term(hw, prof, ld.remote_messages)
    else:
        terms += [Term("gpu_issue", "issue", ld.messages * prof.ll_message_us, True),
                  Term("expert_serial", "sm", ld.tokens_per_expert * prof.ll_token_us, True)]
        # A proxy posts every remote message and every remote count signal (one per expert of
        # another domain); on an unordered fabric the receiver's proxy also handles every
        # signal (it may only publish a count once the tokens it counts have landed).
        signals = shape.num_experts * (ld.ep - ld.domain) / ld.ep
        posted = ld.remote_messages + signals * (1 if hw.fabric.ordered else 2)
        terms += _proxy_term(hw, prof, posted)
    terms.append(Term("launch", "fixed", prof.ll_launch_us, False))
    terms += _latency_terms(ld, hw, hierarchical=False)
    return terms


def phase_time(loads: Loads, hw: Hardware, prof: Profile, shape: ModelShape, fabric_us: float = 0.0,
               sms: Optional[int] = None) -> PhaseTime:
    """Time of the phase described by ``loads`` (see the module docstring).

    ``fabric_us``: the ECMP spine term at raw uplink rate (0 when the fabric never collides);
    ``sms``: SMs of a normal-mode call (None: the profile's, or V2's analytic count).
    """
    if loads.mode == "low_latency":
        terms, used = _low_latency(loads, hw, prof, shape, fabric_us), 0
    elif prof.family == "flexep":
        terms, used = _normal_flexep(loads, hw, prof, shape, fabric_us, sms)
    else:
        terms, used = _normal_deepep(loads, hw, prof, fabric_us, sms)
    over = max((t.us for t in terms if t.overlapped), default=0.0)
    total = over + sum(t.us for t in terms if not t.overlapped)
    return PhaseTime(total_us=total, terms=tuple(terms), sms=int(used or 0))
