"""Per-rank loads of each mode and phase, from flexep's own routing accounting.

The byte counts come from :func:`flexep.accounting.routing_flows` (tested equal to
:func:`flexep.accounting.routing_traffic`, the library's single source of per-link bytes);
this module only says which matrix a mode moves and on which link each entry travels:

* ``flat``: ``flows.flat``, every row straight to its destination rank.
* ``hierarchical``: ``flows.hop1`` over the network (rail-aligned, once per destination node),
  then ``flows.hop2`` inside the node. On a single node it is the flat exchange (DeepEP runs
  its intranode kernels there).
* ``low_latency``: ``flows.selections``, one message per (token, expert), NVLink inside a node.

Combine moves the same rows back, so its loads are the transposed matrices with combine's row
size. The ``copy`` load counts the rows a rank's kernel copies at every hop (its own rows
included: DeepEP's kernels stage them through the same buffers): send, forward (including rows
the forwarder delivers to itself) and receive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..accounting import RoutingFlows, flows_traffic, link_class_matrix
from ..topology import Topology
from .workload import ModelShape

__all__ = ["MODES", "PHASES", "RankLoads", "mode_loads"]

MODES = ("flat", "hierarchical", "low_latency")
PHASES = ("dispatch", "combine")


@dataclass(frozen=True)
class RankLoads:
    """What one phase asks of every rank (all ``[W] float64`` except ``inter_flows``).

    Attributes:
        nic_send, nic_recv: bytes over the rank's NIC, out and in.
        intra_send, intra_recv: bytes over its scale-up link (NVLink), out and in.
        copy: bytes its kernel copies (every hop, own rows included).
        messages: messages it issues (peers x channels in normal mode, one per (token, expert)
            in low-latency mode).
        inter_flows: ``[W, W]`` bytes from sender to receiver across the network (ECMP input).
        counted: bytes per rank as DeepEP's benchmark counts them, ``{"rdma": [W], "nvl": [W]}``
            (tokens x ``hidden * 2`` x FP8 factor; low latency: ``"rdma"`` = all selections).
        link_bytes: total bytes of the phase per link class ``{"local", "intra", "inter"}``,
            what ``Buffer.last_traffic.payload`` sums to over ranks for the same routing.
    """

    nic_send: torch.Tensor
    nic_recv: torch.Tensor
    intra_send: torch.Tensor
    intra_recv: torch.Tensor
    copy: torch.Tensor
    messages: torch.Tensor
    inter_flows: torch.Tensor
    counted: dict
    link_bytes: dict


def _split(m: torch.Tensor, cls: torch.Tensor, row_bytes: float):
    """Bytes per rank out/in over the network and over the scale-up link."""
    m = m.to(torch.float64) * row_bytes
    inter, intra = m * (cls == 2), m * (cls == 1)
    return inter, intra.sum(1), intra.sum(0)


def mode_loads(flows: RoutingFlows, topo: Topology, shape: ModelShape, mode: str, phase: str,
               channels: int) -> RankLoads:
    """Loads of ``mode`` (see :data:`MODES`) in ``phase`` (``"dispatch"``/``"combine"``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be an int >= 1, got {channels!r}")
    back = phase == "combine"
    cls = link_class_matrix(topo)
    classes = ("local", "intra", "inter")
    recv_rows = flows.flat.sum(0).to(torch.float64)  # rows each rank ends up holding
    token = shape.deepep_token_bytes(phase)
    if mode == "low_latency":
        sel = flows.selections.t() if back else flows.selections
        rb = shape.ll_combine_message_bytes() if back else shape.ll_dispatch_message_bytes()
        inter, intra_out, intra_in = _split(sel, cls, rb)
        mine = flows.selections.sum(1).to(torch.float64)  # what DeepEP's LL test counts
        per_sel = shape.ll_combine_message_bytes() if back else shape.ll_dispatch_message_bytes()
        link = {k: int((sel * (cls == i)).sum()) * rb for i, k in enumerate(classes)}
        return RankLoads(inter.sum(1), inter.sum(0), intra_out, intra_in,
                         torch.zeros(topo.world_size, dtype=torch.float64),
                         sel.sum(1).to(torch.float64), inter, {"rdma": mine * per_sel, "nvl": mine * per_sel},
                         link)
    rb = shape.combine_row_bytes() if back else shape.dispatch_row_bytes()
    peers = (cls != 0)
    if mode == "flat" or not topo.is_multi_node:
        m = flows.flat.t() if back else flows.flat
        inter, intra_out, intra_in = _split(m, cls, rb)
        copy_rows = flows.flat.sum(1) + flows.flat.sum(0)
        messages = ((m > 0) & peers).sum(1) * channels
        rdma_rows = flows.hop1.sum(1) if topo.is_multi_node else torch.zeros(topo.world_size)
    else:
        h1 = flows.hop1.t() if back else flows.hop1
        h2 = flows.hop2.t() if back else flows.hop2
        inter, _, _ = _split(h1, cls, rb)
        _, intra_out, intra_in = _split(h2, cls, rb)
        self_delivered = flows.flat.sum(0) - flows.hop2.sum(0)
        copy_rows = flows.hop1.sum(1) + flows.hop2.sum(1) + self_delivered + flows.flat.sum(0)
        messages = (((h1 > 0) & peers).sum(1) + ((h2 > 0) & peers).sum(1)) * channels
        rdma_rows = flows.hop1.sum(1)
    hierarchical = mode == "hierarchical" and topo.is_multi_node
    totals = flows_traffic(flows, topo, rb, hierarchical)  # transposing keeps class totals
    link = {k: totals[k] for k in classes}
    return RankLoads(inter.sum(1), inter.sum(0), intra_out, intra_in,
                     copy_rows.to(torch.float64) * rb, messages.to(torch.float64), inter,
                     {"rdma": rdma_rows.to(torch.float64) * token, "nvl": recv_rows * token}, link)
