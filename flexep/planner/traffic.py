"""What one phase of each mode asks of the busiest rank, from flexep's own routing accounting.

Byte and row counts come from :func:`flexep.accounting.routing_flows` (tested equal to
:func:`flexep.accounting.routing_traffic`, the library's single source of per-link bytes); this
module only says which matrix a mode moves and on which link each entry travels. The "node" of
the accounting is the scale-up domain: pairs inside it travel over the scale-up links, pairs
across domains over the NICs.

* ``flat``: ``flows.flat``, every row straight to its destination rank (DeepEP's intranode and
  V2 direct kernels inside a domain; pure RDMA across domains).
* ``hierarchical``: ``flows.hop1`` over the network (rail-aligned, once per destination domain,
  the own domain's entry included), then ``flows.hop2`` over the scale-up links. Inside one
  domain it is the flat exchange.
* ``low_latency``: ``flows.selections``, one message per (token, expert) (DeepEP), or, for
  fixed-capacity implementations, ``capacity`` rows to every peer whatever the routing (flexep).

Combine moves the same rows back, so its loads are the transposed matrices with combine's row
size. Shape legend: W ranks, N = W / D domains of D ranks, E experts, L = E / W local experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..accounting import RoutingFlows, flows_traffic, link_class_matrix
from ..topology import Topology
from .workload import ModelShape

__all__ = ["MODES", "PHASES", "Loads", "mode_loads"]

MODES = ("flat", "hierarchical", "low_latency")
PHASES = ("dispatch", "combine")


@dataclass(frozen=True)
class Loads:
    """One phase's demands on the busiest rank (each field is its maximum over ranks).

    Attributes:
        mode, phase, ep: what the loads are for; ``domain``: ranks per scale-up domain D;
            ``multi_domain``: the group spans domains.
        row_bytes: bytes of one row (normal modes) or one message (low latency).
        su_send, su_recv: scale-up bytes out of / into a rank (its own rows excluded).
        su_pair: largest bytes between one pair of ranks over the scale-up links (mesh links).
        su_cross: scale-up bytes a rank moves to or from other servers of its domain.
        nic_send, nic_recv: network bytes out of / into a rank.
        rows_send: rows a rank hands to the exchange (every destination, itself included);
            ``rows_recv``: rows it ends up holding; ``rows_stage``: rows it sends to every
            destination domain's entry rank (its own domain included); ``rows_forward``: rows
            it forwards inside its domain as an entry rank (the ones it keeps included).
            ``rows_send_recv`` and ``rows_stage_recv``: the busiest rank's sum of the two
            (work one set of SMs does for both; not the sum of the two maxima).
        su_peers, net_peers: distinct peers a rank exchanges with over each link.
        messages, remote_messages: low-latency messages a rank sends, all / across domains.
        tokens_per_expert: low latency: (token, expert) messages for one local expert on the
            busiest rank (received in dispatch, returned in combine).
        local_experts: L.
        inter_flows: ``[W, W] float64`` network bytes per (sender, receiver) (ECMP input).
        counted: mean rows per rank as benchmarks count them: ``recv_rows`` (tokens received,
            own included), ``node_pairs`` ((token, destination domain) pairs, own included),
            ``selections`` (valid top-k slots).
        link_bytes: total bytes of the phase per link class ``{"local", "intra", "inter"}``,
            what ``Buffer.last_traffic.payload`` sums to over ranks for the same routing.
    """

    mode: str
    phase: str
    ep: int
    domain: int
    multi_domain: bool
    row_bytes: float
    su_send: float = 0.0
    su_recv: float = 0.0
    su_pair: float = 0.0
    su_cross: float = 0.0
    nic_send: float = 0.0
    nic_recv: float = 0.0
    rows_send: float = 0.0
    rows_recv: float = 0.0
    rows_stage: float = 0.0
    rows_forward: float = 0.0
    rows_send_recv: float = 0.0
    rows_stage_recv: float = 0.0
    su_peers: int = 0
    net_peers: int = 0
    messages: float = 0.0
    remote_messages: float = 0.0
    tokens_per_expert: float = 0.0
    local_experts: int = 1
    inter_flows: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 1, dtype=torch.float64))
    counted: dict = field(default_factory=dict)
    link_bytes: dict = field(default_factory=dict)


def _fmax(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


def _split(m: torch.Tensor, cls: torch.Tensor, server: torch.Tensor, nbytes: float) -> dict:
    """Per-rank bytes of ``m [W, W]`` rows over each link, busiest rank's values."""
    b = m.to(torch.float64) * nbytes
    inter, intra = b * (cls == 2), b * (cls == 1)
    cross = intra * (server[:, None] != server[None, :])
    return {"nic_send": _fmax(inter.sum(1)), "nic_recv": _fmax(inter.sum(0)),
            "su_send": _fmax(intra.sum(1)), "su_recv": _fmax(intra.sum(0)), "su_pair": _fmax(intra),
            "su_cross": max(_fmax(cross.sum(1)), _fmax(cross.sum(0))), "inter_flows": inter}


def _peers(m: torch.Tensor, cls: torch.Tensor, which: int) -> int:
    """Most peers over link class ``which`` any rank sends to or receives from."""
    hit = (m > 0) & (cls == which)
    return int(max(hit.sum(1).max(), hit.sum(0).max())) if m.numel() else 0


def mode_loads(flows: RoutingFlows, topo: Topology, shape: ModelShape, mode: str, phase: str,
               server_size: int = 0, capacity: int = 0) -> Loads:
    """Loads of ``mode`` (see :data:`MODES`) in ``phase`` (``"dispatch"``/``"combine"``).

    ``topo.ranks_per_node`` is the scale-up domain size D; ``server_size`` splits a domain into
    servers (for :attr:`Loads.su_cross`; 0 = one server). ``capacity`` > 0 makes the
    low-latency mode fixed-capacity: ``capacity`` rows of ``shape.ll_capacity_row_bytes`` to
    every peer.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    back = phase == "combine"
    world = topo.world_size
    cls = link_class_matrix(topo)
    server = torch.arange(world) // (server_size or topo.ranks_per_node)
    local_experts = shape.num_experts // world
    recv_rows = flows.flat.sum(0).to(torch.float64)
    counted = {"recv_rows": float(recv_rows.mean()), "node_pairs": float(flows.hop1.sum(1).double().mean()),
               "selections": float(flows.selections.sum(1).double().mean())}
    common = dict(mode=mode, phase=phase, ep=world, domain=topo.ranks_per_node,
                  multi_domain=topo.is_multi_node, local_experts=local_experts, counted=counted)
    if mode == "low_latency":
        classes = ("local", "intra", "inter")
        if capacity:
            rb = shape.ll_capacity_row_bytes(back)
            full = torch.full((world, world), capacity, dtype=torch.int64)
            parts = _split(full, cls, server, rb)
            link = {k: int((full * (cls == i)).sum()) * rb for i, k in enumerate(classes)}
            return Loads(row_bytes=rb, **parts, rows_send=float(capacity * world),
                         rows_recv=float(capacity * world), rows_send_recv=float(2 * capacity * world),
                         su_peers=_peers(full, cls, 1),
                         net_peers=_peers(full, cls, 2), messages=float(world - 1),
                         remote_messages=float((cls[0] == 2).sum()), link_bytes=link, **common)
        sel = flows.selections.t() if back else flows.selections
        rb = shape.ll_combine_message_bytes() if back else shape.ll_dispatch_message_bytes()
        parts = _split(sel, cls, server, rb)
        link = {k: int((sel * (cls == i)).sum()) * rb for i, k in enumerate(classes)}
        per_expert = flows.selections.sum(0).double() / max(local_experts, 1)
        return Loads(row_bytes=rb, **parts, rows_send=_fmax(sel.sum(1).double()),
                     rows_recv=_fmax(sel.sum(0).double()),
                     rows_send_recv=_fmax((sel.sum(1) + sel.sum(0)).double()), su_peers=_peers(sel, cls, 1),
                     net_peers=_peers(sel, cls, 2), messages=_fmax(sel.sum(1).double()),
                     remote_messages=_fmax((sel * (cls == 2)).sum(1).double()),
                     tokens_per_expert=_fmax(per_expert), link_bytes=link, **common)
    rb = float(shape.combine_row_bytes() if back else shape.dispatch_row_bytes())
    hierarchical = mode == "hierarchical" and topo.is_multi_node
    flat = flows.flat.t() if back else flows.flat
    rows_send = _fmax(flows.flat.sum(1).double())
    rows_recv = _fmax(recv_rows)
    send_recv = _fmax(flows.flat.sum(1).double() + recv_rows)
    if not hierarchical:
        parts = _split(flat, cls, server, rb)
        su_peers, net_peers = _peers(flat, cls, 1), _peers(flat, cls, 2)
        stage = forward = stage_recv = 0.0
    else:
        h1 = flows.hop1.t() if back else flows.hop1
        h2 = flows.hop2.t() if back else flows.hop2
        net, fwd = _split(h1, cls, server, rb), _split(h2, cls, server, rb)
        parts = {k: net[k] for k in ("nic_send", "nic_recv", "inter_flows")}
        parts.update({k: fwd[k] for k in ("su_send", "su_recv", "su_pair", "su_cross")})
        su_peers, net_peers = _peers(h2, cls, 1), _peers(h1, cls, 2)
        kept = flows.flat.sum(0) - flows.hop2.sum(0)  # rows an entry rank delivers to itself
        stage = _fmax(flows.hop1.sum(1).double())
        forward = _fmax((flows.hop2.sum(1) + kept).double())
        stage_recv = _fmax(flows.hop1.sum(1).double() + recv_rows)
    totals = flows_traffic(flows, topo, int(rb), hierarchical)  # transposing keeps class totals
    link = {k: totals[k] for k in ("local", "intra", "inter")}
    return Loads(row_bytes=rb, **parts, rows_send=rows_send, rows_recv=rows_recv, rows_stage=stage,
                 rows_forward=forward, rows_send_recv=send_recv, rows_stage_recv=stage_recv,
                 su_peers=su_peers, net_peers=net_peers, link_bytes=link, **common)
