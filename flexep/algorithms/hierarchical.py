"""Hierarchical normal-mode dispatch and combine for groups spanning several nodes.

Shape legend: :mod:`flexep.algorithms.contract`; rank ``(n, p)`` is group rank ``n * P + p``.

Dispatch, in two hops (as DeepEP's internode kernels):

1. **rail** (network): a token crosses to each destination node once, to the rank with the
   sender's local index ``p`` there (same NIC rail). Rows of one destination node are sent in
   token order, with the token's metadata.
2. **intra-node** (NVLink/HCCS): each rank forwards what it received over its rail to every
   rank of its node the token is for (itself included, as a local copy).

Receivers get blocks ordered by forwarder then origin node, and reorder them (one gather) to
flat dispatch's order: by global source rank, in source token order. So ``recv_x`` is
**bitwise identical** to the flat algorithm's.

Combine runs the hops backwards: rows go back to the forwarders, which sum their node's rows per
token in float32 and send one partial per (token, node) over the rail; the source sums the
partials per node in node order. Like DeepEP's internode combine, partials are rounded to the
input dtype before crossing the network, so low-precision combine results match the flat
algorithm within one rounding of those partials (float32 and float64 inputs sum in a different
order: equal within float tolerance, exactly equal for integer-valued data).

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
class HierRoute:
    """Replay state of a hierarchical dispatch, kept in the handle.

    Rail hop: ``rail_order [R1]`` token indices grouped by destination node, ``rail_send`` /
    ``rail_recv`` rows per node. Intra hop: ``fwd_order [R2]`` rows of the rail receive buffer
    grouped by destination local rank, ``fwd_send`` / ``fwd_recv`` rows per local rank.
    ``perm [M]`` reorders the intra receive buffer into flat order. The remaining fields build
    DeepEP's internode handle entries on first use.
    """

    topo: Topology
    groups: TopologyGroups
    rank: int
    rail_order: torch.Tensor
    rail_send: tuple
    rail_recv: tuple
    fwd_order: torch.Tensor
    fwd_send: tuple
    fwd_recv: tuple
    perm: torch.Tensor
    in_node: torch.Tensor  # [T, N] bool
    want: torch.Tensor  # [R1', P] bool, rail rows wanted by each local rank
    rail_src_idx: torch.Tensor  # [R1'] int32, source token index of each rail row received
    rail_src_tokens: tuple
    node_counts: torch.Tensor  # [W, N] int64 host, every rank's tokens per node (the routing's)

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
    """Intra receive buffer (forwarder-major, then origin node) -> flat order (source rank).

    Example (N = 2, P = 2, rows from sources 0..3 = [a, b, c, d]): the buffer holds
    ``[a, c | b, d]`` (forwarder 0 carries sources 0 and 2), and the result is ``[0, 2, 1, 3]``.
    """
    nodes, per = topo.num_nodes, topo.ranks_per_node
    sizes = counts[:, rank].view(nodes, per)  # [origin node, forwarder], host
    col_total = sizes.sum(0)
    start = (torch.cumsum(sizes, 0) - sizes) + (torch.cumsum(col_total, 0) - col_total)  # in buffer
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
        self.extra_width = self.topo.num_nodes

    def extra(self, req: DispatchRequest) -> torch.Tensor:
        """``[N]`` this rank's tokens with an expert on each node."""
        return node_membership(req.is_token_in_rank, self.topo.ranks_per_node).sum(0)

    def stage(self, req: DispatchRequest, sends: Sends) -> _Staged:
        """Rows for hop 1, one per (token, destination node), grouped by node."""
        per, nodes = self.topo.ranks_per_node, self.topo.num_nodes
        in_node = node_membership(req.is_token_in_rank, per)
        order = send_order(in_node, sum(sends.extra))
        mask = None
        if req.topk_idx is None:
            # Without top-k ids the forwarder cannot tell which of its node's ranks want the token.
            node_of_row = segment_ids(sends.extra, req.device)
            mask = req.is_token_in_rank.view(-1, nodes, per)[order, node_of_row].to(torch.uint8)
        meta, specs = pack_token_meta(order, req.topk_idx, req.topk_weights, req.scales, extra=mask)
        return _Staged(order, gather_rows(self.tp.workspace, "send_x", wire_view(req.x), order), meta, specs)

    def dispatch(self, req: DispatchRequest, staged: _Staged, header: Header,
                 expert_counts: Optional[Sequence[int]]) -> Dispatched:
        tp, topo, rank = self.tp, self.topo, self.tp.rank
        per = topo.ranks_per_node
        me_node, me_local = topo.node_of(rank), topo.local_rank_of(rank)
        local = req.num_experts // tp.world
        rail_members, node_members = topo.rail_ranks(me_local), topo.node_ranks(me_node)
        counts, device, x = header.counts, req.device, req.x
        ws = tp.workspace

        # Hop 1: one row per (token, destination node) over the rail.
        rail_send = header.extra[rank].tolist()
        rail_recv = header.extra[rail_members, me_node].tolist()
        rail_x = ws.get("rail_recv", (sum(rail_recv), x.size(1)), wire_view(x).dtype, device)
        rail_meta = staged.meta.new_empty(sum(rail_recv), staged.meta.size(1))
        tp.fault_point("before_payload")
        tp.all_to_all("rail", [staged.x, staged.meta], [rail_x, rail_meta], rail_send, rail_recv,
                      group=self.groups.rail, role="rail", members=rail_members)

        # Hop 2: forward each rail row to the ranks of this node that want it. The counts are
        # the routing's: local rank p gets, from me, the tokens of my rail with an expert on p.
        got = unpack_rows(rail_meta, staged.specs)
        if req.topk_idx is not None:
            owner = torch.where(got[1] >= 0, torch.div(got[1], local, rounding_mode="floor"), tp.world)
            want = torch.zeros(owner.size(0), tp.world + 1, dtype=torch.bool, device=device)
            want.scatter_(1, owner, True)
            want = want[:, me_node * per:(me_node + 1) * per].contiguous()
        else:
            want = got[1].bool()
        fwd_send = counts[rail_members][:, node_members].sum(0).tolist()
        fwd_recv = counts[:, rank].view(topo.num_nodes, per).sum(0).tolist()
        fwd_order = send_order(want, sum(fwd_send))
        keep = [i for i in range(len(got)) if req.topk_idx is not None or i != 1]
        fwd_meta = pack_rows([got[i] for i in keep])
        fwd_specs = [staged.specs[i] for i in keep]
        intra_x = ws.get("intra_recv", (sum(fwd_recv), x.size(1)), wire_view(x).dtype, device)
        intra_meta = fwd_meta.new_empty(sum(fwd_recv), fwd_meta.size(1))
        fwd_x = gather_rows(ws, "fwd_send", rail_x, fwd_order)
        tp.all_to_all("intra", [fwd_x, fwd_meta.index_select(0, fwd_order)], [intra_x, intra_meta],
                      fwd_send, fwd_recv, group=self.groups.intra, role="intra", members=node_members)

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
            rail_recv=tuple(rail_recv), fwd_order=fwd_order, fwd_send=tuple(fwd_send),
            fwd_recv=tuple(fwd_recv), perm=perm, in_node=node_membership(req.is_token_in_rank, per),
            want=want, rail_src_idx=got[0].view(-1),
            rail_src_tokens=tuple(src_tokens[r] for r in rail_members), node_counts=header.extra)
        handle = NormalHandle(
            is_token_in_rank=req.is_token_in_rank, recv_src_idx=recv.src_idx, counts=counts,
            src_tokens=tuple(src_tokens), rank=rank, handle_channels=req.handle_channels,
            num_recv_tokens=num_recv, hidden=x.size(1), owner=self.owner, route=route)
        return Dispatched(recv_x, recv.scales, recv.topk_idx, recv.topk_weights, expert_counts, handle)

    def _two_hops(self, route: HierRoute, tensors: Sequence[torch.Tensor],
                  outs: Sequence[torch.Tensor]) -> None:
        """Replay both dispatch hops for row-aligned ``tensors [T, ...]`` into ``outs [M, ...]``.

        Intermediate rows live in the workspace, as in :meth:`dispatch`; the final reorder
        writes straight into ``outs``.
        """
        tp, ws = self.tp, self.tp.workspace
        rail_members, node_members = route.members()

        def name(base: str, i: int) -> str:  # the data rows share dispatch's scratch buffers
            return base if i == 0 else f"{base}{i}"

        rail_in = [gather_rows(ws, name("send_x", i), wire_view(t), route.rail_order)
                   for i, t in enumerate(tensors)]
        rail_out = [ws.get(name("rail_recv", i), (sum(route.rail_recv), *t.shape[1:]), t.dtype, t.device)
                    for i, t in enumerate(rail_in)]
        tp.all_to_all("rail", rail_in, rail_out, route.rail_send, route.rail_recv,
                      group=self.groups.rail, role="rail", members=rail_members)
        fwd_in = [gather_rows(ws, name("fwd_send", i), t, route.fwd_order) for i, t in enumerate(rail_out)]
        fwd_out = [ws.get(name("intra_recv", i), (sum(route.fwd_recv), *t.shape[1:]), t.dtype, t.device)
                   for i, t in enumerate(fwd_in)]
        tp.all_to_all("intra", fwd_in, fwd_out, route.fwd_send, route.fwd_recv,
                      group=self.groups.intra, role="intra", members=node_members)
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
        tp.fault_point("before_payload")
        # Hop 2 backwards: rows return to their forwarders in the order those sent them.
        back = [gather_rows(ws, f"back{i}", t, inverse) for i, t in enumerate(tensors)]
        at_fwd = [ws.get(f"at_fwd{i}", (sum(route.fwd_send), t.size(1)), t.dtype, t.device)
                  for i, t in enumerate(back)]
        tp.all_to_all("intra", back, at_fwd, route.fwd_recv, route.fwd_send, group=self.groups.intra,
                      role="intra", members=node_members)
        # Partial sum per rail row over this node's ranks; rounded to the wire dtype like DeepEP.
        partial = [sum_blocks(t, route.fwd_order, route.fwd_send, sum(route.rail_recv), (), ws,
                              out=ws.get(f"partial{i}", (sum(route.rail_recv), t.size(1)), t.dtype, t.device))
                   for i, t in enumerate(at_fwd)]
        # Hop 1 backwards: one partial per (token, node) crosses the network.
        at_src = [ws.get(f"at_src{i}", (sum(route.rail_send), t.size(1)), t.dtype, t.device)
                  for i, t in enumerate(partial)]
        tp.all_to_all("rail", partial, at_src, route.rail_recv, route.rail_send, group=self.groups.rail,
                      role="rail", members=rail_members)
        out = sum_blocks(at_src[0], route.rail_order, route.rail_send, h.num_tokens, req.bias, ws)
        combined_w = None
        if req.topk_weights is not None:
            combined_w = sum_blocks(at_src[1], route.rail_order, route.rail_send, h.num_tokens)
        return Combined(out, combined_w)
