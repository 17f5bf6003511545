"""Hierarchical normal-mode dispatch and combine for groups spanning several nodes.

Shape legend: :mod:`flexep.algorithms.contract`; rank ``(n, p)`` is group rank ``n * P + p``.

Dispatch, in two hops (as DeepEP's internode kernels):

1. **rail** (network): a token crosses to each destination node once, to the rank with the
   sender's local index ``p`` there (same NIC rail). Rows of one destination node are sent in
   token order, with the token's metadata.
2. **intra-node** (NVLink/HCCS): each rank forwards what it received over its rail to every
   rank of its node the token is for (itself included, as a local copy).

The hops overlap: while the rail exchange crosses the network, each rank forwards the rows its
own node's tokens need (its own tokens, which never leave the node) to its node peers; the rows
that came over the rail follow once it completes. Receivers get the own-node part (by
forwarder), then the rest (by forwarder, then origin node), and reorder them (one gather) to
flat dispatch's order: by global source rank, in source token order. So ``recv_x`` is
**bitwise identical** to the flat algorithm's.

Combine runs the hops backwards, overlapped the same way: the rows of other nodes' tokens go
back to their forwarders first, which sum their node's rows per token in float32 and send one
partial per (token, node) over the rail; while those cross the network, the rows of this node's
own tokens are reduced the same way and put straight where the rail would have delivered them.
The source sums the partials per node in node order. Like DeepEP's internode combine, partials
are rounded to the input dtype before crossing the network, so low-precision combine results
match the flat algorithm within one rounding of those partials (float32 and float64 inputs sum
in a different order: equal within float tolerance, exactly equal for integer-valued data).

Every size comes from the control round: ``counts [W, W]`` (tokens per source and destination
rank) and, in its extra columns, every rank's per-node token counts; no size is read from the
device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Sequence

import torch

from .._dtypes import wire_view
from ..comm.control import Header
from ..comm.topology import Topology, TopologyGroups
from ..comm.transport import Transport
from .contract import (
    CachedDispatchRequest,
    Combined,
    CombineRequest,
    Dispatched,
    DispatchRequest,
    NormalHandle,
    Sends,
)
from .flat import finish_receive
from .packing import (
    channel_prefix,
    gather_rows,
    pack_rows,
    pack_token_meta,
    padded_rows,
    position_in_group,
    recv_channel_prefix,
    segment_ids,
    send_order,
    unpack_rows,
)
from .reduce import sum_blocks

__all__ = ["Hierarchical", "HierRoute", "node_membership"]


def node_membership(is_token_in_rank: torch.Tensor, ranks_per_node: int) -> torch.Tensor:
    """``[T, W] -> [T, N] bool``: token t goes to at least one rank of node n.

    Example (P = 2): ``[[0, 1, 0, 0], [0, 0, 1, 1]] -> [[1, 0], [0, 1]]``.
    """
    tokens, world = is_token_in_rank.shape
    return is_token_in_rank.view(tokens, world // ranks_per_node, ranks_per_node).any(2)


@dataclass(frozen=True)
class _Forward:
    """One part of the intra-node hop: ``order`` rows grouped by destination local rank,
    ``send`` / ``recv`` rows per local rank."""

    order: torch.Tensor
    send: tuple
    recv: tuple


def _block(counts: Sequence[int], i: int) -> tuple[int, int]:
    """Row range ``[lo, hi)`` of block ``i`` when blocks of ``counts`` rows are stacked."""
    lo = sum(counts[:i])
    return lo, lo + counts[i]


def _around(index: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Indices into rows with ``[lo, hi)`` removed -> indices into the full rows."""
    return index + (index >= lo).to(index.dtype) * (hi - lo)


def _zero(counts: Sequence[int], i: int) -> list:
    """``counts`` with entry ``i`` set to 0 (a block that does not go through the exchange)."""
    return [0 if j == i else c for j, c in enumerate(counts)]


def _without(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``t`` without rows ``[lo, hi)``: a view when they are at one end, else a copy (not a view)."""
    if lo == 0 or hi == t.size(0):
        return t[hi:] if lo == 0 else t[:lo]
    return torch.cat([t[:lo], t[hi:]])


@dataclass(frozen=True)
class HierRoute:
    """Replay state of a hierarchical dispatch, kept in the handle.

    Rail hop: ``rail_order [R1]`` token indices grouped by destination node, ``rail_send`` /
    ``rail_recv`` rows per node. Intra hop, in two parts: ``own`` forwards this rank's own
    tokens to its node (``order``: rows of its own block of the rail send buffer), ``rest`` the
    rows that came over the rail from other nodes (``order``: rows of the rail receive buffer
    without the own block); each grouped by destination local rank. ``perm [M]`` reorders the
    intra receive buffer (own part, then the rest) into flat order. The remaining fields build
    DeepEP's internode handle entries on first use.
    """

    topo: Topology
    groups: TopologyGroups
    rank: int
    rail_order: torch.Tensor
    rail_send: tuple
    rail_recv: tuple
    own: _Forward
    rest: _Forward
    perm: torch.Tensor
    in_node: torch.Tensor  # [T, N] bool
    want: torch.Tensor  # [R1', P] bool, rail rows wanted by each local rank
    rail_src_idx: torch.Tensor  # [R1'] int32, source token index of each rail row received
    rail_src_tokens: tuple
    node_counts: torch.Tensor  # [W, N] int64 host, every rank's tokens per node (the routing's)
    rail_weights: Optional[tuple]  # (send, recv) rail channel weights per rail peer, or None

    def members(self) -> tuple[list, list]:
        """EP ranks of this rank's (rail group, node group), in group-rank order."""
        return (self.topo.rail_ranks(self.topo.local_rank_of(self.rank)),
                self.topo.node_ranks(self.topo.node_of(self.rank)))

    @cached_property
    def _deepep_extra(self) -> tuple:
        device = self.perm.device
        return (torch.tensor(self.rail_recv, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32),
                position_in_group(self.in_node), position_in_group(self.want))

    def deepep_tuple(self, h: NormalHandle) -> tuple:
        """DeepEP's 10-entry internode handle; ``[-4]`` is ``recv_gbl_rank_prefix_sum [W]``."""
        channels, per = h.handle_channels, self.topo.ranks_per_node
        device = h.recv_src_idx.device
        recv_counts = h.recv_counts
        recv_rdma_rank_prefix, send_rdma_head, send_nvl_head = self._deepep_extra
        src_rank = segment_ids(recv_counts, device)
        src_meta = torch.zeros(h.num_rows, 8, dtype=torch.uint8, device=device)
        src_meta[:h.num_recv_tokens, 0] = torch.div(src_rank, per, rounding_mode="floor").to(torch.uint8)
        src_meta[:h.num_recv_tokens, 1] = (src_rank % per).to(torch.uint8)
        recv_gbl = torch.tensor(recv_counts, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
        return (h.is_token_in_rank, channel_prefix(self.in_node, channels), h.channel_prefix_matrix,
                recv_channel_prefix(self.rail_src_idx, self.rail_recv, self.rail_src_tokens, channels),
                recv_rdma_rank_prefix, h.recv_channel_prefix_matrix, recv_gbl, src_meta,
                send_rdma_head, send_nvl_head)


@dataclass(frozen=True)
class _Staged:
    order: torch.Tensor  # [R1] int64, token of each rail row, grouped by destination node
    x: torch.Tensor  # [R1, H] wire dtype (a workspace view)
    meta: torch.Tensor  # [R1, B] uint8
    specs: list


def _intra_perm(counts: torch.Tensor, rank: int, topo: Topology, device: torch.device) -> torch.Tensor:
    """Intra receive buffer -> flat order (by source rank).

    The buffer holds the own-node part (by forwarder), then the rest (by forwarder, then origin
    node). Example (N = 2, P = 2, receiving rank on node 1, rows from sources 0..3 =
    [a, b, c, d]): the buffer holds ``[c, d | a, b]`` (forwarder 0 carries sources 2, then 0),
    and the result is ``[2, 3, 0, 1]``.
    """
    nodes, per = topo.num_nodes, topo.ranks_per_node
    me = topo.node_of(rank)
    sizes = counts[:, rank].view(nodes, per).clone()  # [origin node, forwarder], host
    own = sizes[me].clone()
    sizes[me] = 0
    col_total = sizes.sum(0)
    start = (torch.cumsum(sizes, 0) - sizes) + (torch.cumsum(col_total, 0) - col_total) + own.sum()
    start[me] = torch.cumsum(own, 0) - own
    sizes[me] = own
    flat = sizes.reshape(-1)
    shift = (start.reshape(-1) - (torch.cumsum(flat, 0) - flat)).to(device)
    total = int(flat.sum())
    return shift[segment_ids(flat.tolist(), device)] + torch.arange(total, device=device)


class Hierarchical:
    """The two-hop algorithm over an EP group and its node and rail subgroups."""

    name = "hierarchical"

    def __init__(self, tp: Transport, groups: TopologyGroups, owner: int) -> None:
        self.tp, self.groups, self.owner = tp, groups, owner
        self.topo = tp.topo
        nodes, self.lanes = self.topo.num_nodes, tp.lanes("rail")
        # Per-node token counts, then (with channels) this rank's rail channel weights per node.
        self.extra_width = nodes + (nodes * self.lanes if self.lanes > 1 else 0)

    def extra(self, req: DispatchRequest) -> torch.Tensor:
        """``[N]`` this rank's tokens with an expert on each node, then, with C > 1 channels,
        ``[N * C]`` the weights by which the rail peer on each node is to cut its rows to this
        rank over the channels (:meth:`Transport.recv_weights`)."""
        counts = node_membership(req.is_token_in_rank, self.topo.ranks_per_node).sum(0)
        if self.lanes == 1:
            return counts
        rail = self.topo.rail_ranks(self.topo.local_rank_of(self.tp.rank))
        weights = torch.tensor(self.tp.recv_weights("rail", rail), dtype=counts.dtype, device=counts.device)
        return torch.cat([counts, weights])

    def _rail_weights(self, header: Header, rail_members: Sequence[int]) -> Optional[tuple]:
        """``(send, recv)`` channel weights per rail peer, from the weights every rank published."""
        if self.lanes == 1:
            return None
        nodes, lanes, me_node = self.topo.num_nodes, self.lanes, self.topo.node_of(self.tp.rank)
        cols = header.extra[:, nodes:].view(-1, nodes, lanes)
        send = [tuple(cols[peer, me_node].tolist()) for peer in rail_members]
        recv = [tuple(cols[self.tp.rank, n].tolist()) for n in range(nodes)]
        return tuple(send), tuple(recv)

    def stage(self, req: DispatchRequest, sends: Sends) -> _Staged:
        """Rows for hop 1, one per (token, destination node), grouped by node."""
        per, nodes = self.topo.ranks_per_node, self.topo.num_nodes
        in_node = node_membership(req.is_token_in_rank, per)
        node_rows = sends.extra[:nodes]
        order = send_order(in_node, sum(node_rows))
        mask = None
        if req.topk_idx is None:
            # Without top-k ids the forwarder cannot tell which of its node's ranks want the token.
            node_of_row = segment_ids(node_rows, req.device)
            mask = req.is_token_in_rank.view(-1, nodes, per)[order, node_of_row].to(torch.uint8)
        meta, specs = pack_token_meta(order, req.topk_idx, req.topk_weights, req.scales, extra=mask)
        return _Staged(order, gather_rows(self.tp.workspace, "send_x", wire_view(req.x), order), meta, specs)

    def _wanted(self, got: Sequence[torch.Tensor], req: DispatchRequest) -> torch.Tensor:
        """``[R, P] bool``: which local ranks of this node want each rail row (from its metadata)."""
        tp, per = self.tp, self.topo.ranks_per_node
        if req.topk_idx is None:
            return got[1].bool()
        local = req.num_experts // tp.world
        me_node = self.topo.node_of(tp.rank)
        owner = torch.where(got[1] >= 0, torch.div(got[1], local, rounding_mode="floor"), tp.world)
        want = torch.zeros(owner.size(0), tp.world + 1, dtype=torch.bool, device=owner.device)
        want.scatter_(1, owner, True)
        return want[:, me_node * per:(me_node + 1) * per].contiguous()

    def dispatch(self, req: DispatchRequest, staged: _Staged, header: Header,
                 expert_counts: Optional[Sequence[int]]) -> Dispatched:
        tp, topo, rank = self.tp, self.topo, self.tp.rank
        per = topo.ranks_per_node
        me_node, me_local = topo.node_of(rank), topo.local_rank_of(rank)
        rail_members, node_members = topo.rail_ranks(me_local), topo.node_ranks(me_node)
        counts, device, x = header.counts, req.device, req.x
        ws = tp.workspace
        intra = dict(group=self.groups.intra, role="intra", members=node_members)

        # Hop 1: one row per (token, destination node) over the rail; posted, not waited.
        rail_send = header.extra[rank, :topo.num_nodes].tolist()
        rail_recv = header.extra[rail_members, me_node].tolist()
        weights = self._rail_weights(header, rail_members)
        rail_x = ws.get("rail_recv", (sum(rail_recv), x.size(1)), wire_view(x).dtype, device)
        rail_meta = staged.meta.new_empty(sum(rail_recv), staged.meta.size(1))
        tp.fault_point("before_payload")
        rail = tp.start("rail", [staged.x, staged.meta], [rail_x, rail_meta], rail_send, rail_recv,
                        group=self.groups.rail, role="rail", members=rail_members, lane_weights=weights)

        # Hop 2, counts from the routing: local rank p gets, from forwarder f, the tokens of f's
        # rail with an expert on p; the own part is f's own tokens, the rest came over the rail.
        keep = [i for i in range(len(staged.specs)) if req.topk_idx is not None or i != 1]
        fwd_specs = [staged.specs[i] for i in keep]
        fwd_recv_all = counts[:, rank].view(topo.num_nodes, per).sum(0).tolist()
        own_send = counts[rank, node_members].tolist()
        own_recv = counts[node_members, rank].tolist()
        rest_send = (counts[rail_members][:, node_members].sum(0) - counts[rank, node_members]).tolist()
        rest_recv = [a - b for a, b in zip(fwd_recv_all, own_recv)]
        split = sum(own_recv)

        # Own part while the rail exchange crosses the network: this rank's rows for its own
        # node are its own block of the rail send buffer (the rail only copies them locally).
        s_lo, s_hi = _block(rail_send, me_node)
        own_got = unpack_rows(staged.meta[s_lo:s_hi], staged.specs)
        own = _Forward(send_order(self._wanted(own_got, req), sum(own_send)), tuple(own_send),
                       tuple(own_recv))
        own_meta = pack_rows([own_got[i] for i in keep])
        intra_x = ws.get("intra_recv", (sum(fwd_recv_all), x.size(1)), wire_view(x).dtype, device)
        intra_meta = own_meta.new_empty(sum(fwd_recv_all), own_meta.size(1))
        tp.all_to_all("intra", [gather_rows(ws, "fwd_send", staged.x[s_lo:s_hi], own.order),
                                own_meta.index_select(0, own.order)],
                      [intra_x[:split], intra_meta[:split]], own.send, own.recv, **intra)

        # The rest once the rail exchange is in.
        tp.wait(rail)
        got = unpack_rows(rail_meta, staged.specs)
        want = self._wanted(got, req)
        r_lo, r_hi = _block(rail_recv, me_node)
        rest = _Forward(send_order(_without(want, r_lo, r_hi), sum(rest_send)), tuple(rest_send),
                        tuple(rest_recv))
        rows = _around(rest.order, r_lo, r_hi)
        tp.all_to_all("intra", [gather_rows(ws, "fwd_send_rest", rail_x, rows),
                                pack_rows([got[i] for i in keep]).index_select(0, rows)],
                      [intra_x[split:], intra_meta[split:]], rest.send, rest.recv, **intra)

        # Reorder to flat order: by global source rank, source token order inside each.
        perm = _intra_perm(counts, rank, topo, device)
        num_recv = int(counts[:, rank].sum())
        rows = max(num_recv, req.num_worst_tokens)
        recv_x = padded_rows(x, rows, num_recv)
        torch.index_select(intra_x, 0, perm, out=wire_view(recv_x[:num_recv]))
        recv = finish_receive(unpack_rows(intra_meta.index_select(0, perm), fwd_specs), rows, num_recv,
                              req, rank, tp.world)
        src_tokens = header.field("num_tokens")
        route = HierRoute(
            topo=topo, groups=self.groups, rank=rank, rail_order=staged.order, rail_send=tuple(rail_send),
            rail_recv=tuple(rail_recv), own=own, rest=rest, perm=perm,
            in_node=node_membership(req.is_token_in_rank, per), want=want, rail_src_idx=got[0].view(-1),
            rail_src_tokens=tuple(src_tokens[r] for r in rail_members),
            node_counts=header.extra[:, :topo.num_nodes], rail_weights=weights)
        handle = NormalHandle(
            is_token_in_rank=req.is_token_in_rank, recv_src_idx=recv.src_idx, counts=counts,
            src_tokens=tuple(src_tokens), rank=rank, handle_channels=req.handle_channels,
            num_recv_tokens=num_recv, hidden=x.size(1), owner=self.owner, route=route)
        return Dispatched(recv_x, recv.scales, recv.topk_idx, recv.topk_weights, expert_counts, handle)

    def _two_hops(self, route: HierRoute, tensors: Sequence[torch.Tensor],
                  outs: Sequence[torch.Tensor]) -> None:
        """Replay both dispatch hops for row-aligned ``tensors [T, ...]`` into ``outs [M, ...]``.

        Overlapped as in :meth:`dispatch`; intermediate rows live in the workspace, and the
        final reorder writes straight into ``outs``.
        """
        tp, ws = self.tp, self.tp.workspace
        rail_members, node_members = route.members()
        intra = dict(group=self.groups.intra, role="intra", members=node_members)
        me_node = self.topo.node_of(tp.rank)
        s_lo, s_hi = _block(route.rail_send, me_node)
        r_lo, r_hi = _block(route.rail_recv, me_node)
        split = sum(route.own.recv)

        def name(base: str, i: int) -> str:  # the data rows share dispatch's scratch buffers
            return base if i == 0 else f"{base}{i}"

        rail_in = [gather_rows(ws, name("send_x", i), wire_view(t), route.rail_order)
                   for i, t in enumerate(tensors)]
        rail_out = [ws.get(name("rail_recv", i), (sum(route.rail_recv), *t.shape[1:]), t.dtype, t.device)
                    for i, t in enumerate(rail_in)]
        rail = tp.start("rail", rail_in, rail_out, route.rail_send, route.rail_recv,
                        group=self.groups.rail, role="rail", members=rail_members,
                        lane_weights=route.rail_weights)
        fwd_out = [ws.get(name("intra_recv", i), (split + sum(route.rest.recv), *t.shape[1:]), t.dtype,
                          t.device) for i, t in enumerate(rail_in)]
        tp.all_to_all("intra", [gather_rows(ws, name("fwd_send", i), t[s_lo:s_hi], route.own.order)
                                for i, t in enumerate(rail_in)],
                      [t[:split] for t in fwd_out], route.own.send, route.own.recv, **intra)
        tp.wait(rail)
        rows = _around(route.rest.order, r_lo, r_hi)
        tp.all_to_all("intra", [gather_rows(ws, name("fwd_send_rest", i), t, rows)
                                for i, t in enumerate(rail_out)],
                      [t[split:] for t in fwd_out], route.rest.send, route.rest.recv, **intra)
        for src, out in zip(fwd_out, outs):
            torch.index_select(src, 0, route.perm, out=wire_view(out))

    def cached_dispatch(self, req: CachedDispatchRequest) -> Dispatched:
        """Send ``x`` (and scales) along a hierarchical handle's routing."""
        h = req.handle
        rows, num_recv = h.num_rows, h.num_recv_tokens
        recv_x = padded_rows(req.x, rows, num_recv)
        tensors, outs = [req.x], [recv_x[:num_recv]]
        recv_scales = None
        if req.scales is not None:
            recv_scales = torch.zeros(rows, req.scales.size(1), dtype=req.scales.dtype, device=req.device)
            tensors.append(req.scales.contiguous())
            outs.append(recv_scales[:num_recv])
        self.tp.fault_point("before_payload")
        self._two_hops(h.route, tensors, outs)
        return Dispatched(recv_x, recv_scales, None, None, None, h)

    def combine(self, req: CombineRequest) -> Combined:
        """Reduce inside each node, cross the network once per (token, node), reduce at the source."""
        tp, h = self.tp, req.handle
        route: HierRoute = h.route
        rail_members, node_members = route.members()
        num_recv = h.num_recv_tokens
        inverse = torch.empty_like(route.perm)
        inverse[route.perm] = torch.arange(route.perm.numel(), device=route.perm.device)
        tensors = [req.x[:num_recv]] + ([req.topk_weights[:num_recv]] if req.topk_weights is not None else [])
        ws = tp.workspace
        intra = dict(group=self.groups.intra, role="intra", members=node_members)
        me_node = self.topo.node_of(tp.rank)
        s_lo, s_hi = _block(route.rail_send, me_node)
        r_lo, r_hi = _block(route.rail_recv, me_node)
        split = sum(route.own.recv)
        tp.fault_point("before_payload")
        # Hop 2 backwards: rows return to their forwarders in the order those sent them; first
        # those of other nodes' tokens, whose node partials then cross the network.
        back = [gather_rows(ws, f"back{i}", t, inverse) for i, t in enumerate(tensors)]
        at_fwd = [ws.get(f"at_fwd{i}", (sum(route.rest.send), t.size(1)), t.dtype, t.device)
                  for i, t in enumerate(back)]
        tp.all_to_all("intra", [t[split:] for t in back], at_fwd, route.rest.recv, route.rest.send, **intra)
        # Partial sum per rail row over this node's ranks; rounded to the wire dtype like DeepEP.
        remote = sum(route.rail_recv) - (r_hi - r_lo)
        partial = [sum_blocks(t, route.rest.order, route.rest.send, remote, (), ws,
                              out=ws.get(f"partial{i}", (remote, t.size(1)), t.dtype, t.device))
                   for i, t in enumerate(at_fwd)]
        # Hop 1 backwards: one partial per (token, other node) crosses the network ...
        at_src = [ws.get(f"at_src{i}", (sum(route.rail_send), t.size(1)), t.dtype, t.device)
                  for i, t in enumerate(partial)]
        # Where the other nodes' partials land: a view of at_src, unless nodes lie on both sides.
        split_landing = 0 < s_lo and s_hi < at_src[0].size(0)
        landing = [ws.get(f"landing{i}", (t.size(0) - (s_hi - s_lo), t.size(1)), t.dtype, t.device)
                   if split_landing else _without(t, s_lo, s_hi) for i, t in enumerate(at_src)]
        rail = tp.start("rail", partial, landing, _zero(route.rail_recv, me_node),
                        _zero(route.rail_send, me_node), group=self.groups.rail, role="rail",
                        members=rail_members, lane_weights=route.rail_weights)
        # ... while this node's own tokens are reduced the same way, straight into their place.
        at_fwd = [ws.get(f"at_fwd_own{i}", (sum(route.own.send), t.size(1)), t.dtype, t.device)
                  for i, t in enumerate(back)]
        tp.all_to_all("intra", [t[:split] for t in back], at_fwd, route.own.recv, route.own.send, **intra)
        for t, dst in zip(at_fwd, at_src):
            sum_blocks(t, route.own.order, route.own.send, s_hi - s_lo, (), ws, out=dst[s_lo:s_hi])
            tp.stats.record("local", (s_hi - s_lo) * dst.size(1) * dst.element_size(), True)
        tp.wait(rail)
        for got, dst in zip(landing, at_src) if split_landing else ():
            dst[:s_lo].copy_(got[:s_lo])
            dst[s_hi:].copy_(got[s_lo:])
        out = sum_blocks(at_src[0], route.rail_order, route.rail_send, h.num_tokens, req.bias, ws)
        combined_w = None
        if req.topk_weights is not None:
            combined_w = sum_blocks(at_src[1], route.rail_order, route.rail_send, h.num_tokens)
        return Combined(out, combined_w)
