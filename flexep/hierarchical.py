"""Hierarchical normal dispatch and combine for groups spanning several nodes.

Shape legend: T tokens here, H hidden, W ranks, N nodes, P ranks per node, rank ``(n, p)`` is
group rank ``n * P + p``; M tokens received here.

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

The header round has provided ``counts [W, W]`` (tokens per source/destination rank) and, in its
extra columns, each rank's per-node token counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ._dtypes import wire_view
from .layout import send_order
from .normal import (
    DispatchResult,
    NormalHandle,
    Staged,
    channel_prefix,
    finish_receive,
    gather_rows,
    pack_rows,
    pack_token_meta,
    padded_rows,
    position_in_group,
    recv_channel_prefix,
    unpack_rows,
)
from .reduce import sum_blocks
from .topology import Topology, TopologyGroups
from .transport import LINK_CLASSES, Transport

__all__ = ["HierPlan", "stage", "dispatch", "cached_dispatch", "combine", "node_membership"]


def node_membership(is_token_in_rank: torch.Tensor, ranks_per_node: int) -> torch.Tensor:
    """``[T, W] -> [T, N] bool``: token t goes to at least one rank of node n.

    Example (P = 2): ``[[0, 1, 0, 0], [0, 0, 1, 1]] -> [[1, 0], [0, 1]]``.
    """
    tokens, world = is_token_in_rank.shape
    return is_token_in_rank.view(tokens, world // ranks_per_node, ranks_per_node).any(2)


@dataclass(frozen=True)
class HierPlan:
    """Routing state of a hierarchical dispatch, kept in the handle for combine/cached dispatch.

    Rail hop: ``rail_order [R1]`` token indices grouped by destination node;
    ``rail_send/rail_recv`` rows per node. Intra hop: ``fwd_order [R2]`` rows of the rail
    receive buffer grouped by destination local rank; ``fwd_send/fwd_recv`` rows per local rank.
    ``perm [M]`` reorders the intra receive buffer into flat order.
    """

    topo: Topology
    groups: TopologyGroups
    rail_order: torch.Tensor
    rail_send: tuple
    rail_recv: tuple
    fwd_order: torch.Tensor
    fwd_send: tuple
    fwd_recv: tuple
    perm: torch.Tensor
    mask_bytes: int
    deepep: tuple  # the DeepEP internode handle entries not stored in NormalHandle

    def members(self, rank: int) -> tuple[list, list]:
        """EP ranks of this rank's (rail group, node group), in group-rank order."""
        return (self.topo.rail_ranks(self.topo.local_rank_of(rank)),
                self.topo.node_ranks(self.topo.node_of(rank)))

    def as_deepep_tuple(self, h: NormalHandle) -> tuple:
        """DeepEP's 10-entry internode handle; ``[-4]`` is ``recv_gbl_rank_prefix_sum [W]``."""
        (rdma_prefix, recv_rdma_prefix, recv_rdma_rank_prefix, recv_gbl_rank_prefix, src_meta,
         send_rdma_head, send_nvl_head) = self.deepep
        return (h.is_token_in_rank, rdma_prefix, h.channel_prefix_matrix, recv_rdma_prefix,
                recv_rdma_rank_prefix, h.recv_channel_prefix_matrix, recv_gbl_rank_prefix, src_meta,
                send_rdma_head, send_nvl_head)

    def minimum_bytes(self, topo: Topology, rank: int, row_bytes: int, reverse: bool,
                      with_mask: bool = True) -> dict:
        """What this rank must send: one row per (token, node) on the rail, per (token, rank)
        inside the node; combine sends the same rows back. Only a first dispatch without top-k
        ids carries the node mask (``with_mask``)."""
        out = dict.fromkeys(LINK_CLASSES, 0)
        rail, node = self.members(rank)
        rail_counts = self.rail_recv if reverse else self.rail_send
        fwd_counts = self.fwd_recv if reverse else self.fwd_send
        rail_row = row_bytes + (self.mask_bytes if with_mask and not reverse else 0)
        for peer, n in zip(rail, rail_counts):
            out[topo.link_class(rank, peer)] += n * rail_row
        for peer, n in zip(node, fwd_counts):
            out[topo.link_class(rank, peer)] += n * row_bytes
        return out


def _intra_perm(counts: torch.Tensor, rank: int, topo: Topology) -> torch.Tensor:
    """Intra receive buffer (forwarder-major, then origin node) -> flat order (source rank).

    Example (N = 2, P = 2, rows from sources 0..3 = [a, b, c, d]): the buffer holds
    ``[a, c | b, d]`` (forwarder 0 carries sources 0 and 2), and the result is ``[0, 2, 1, 3]``.
    """
    nodes, per = topo.num_nodes, topo.ranks_per_node
    sizes = counts[:, rank].view(nodes, per)  # [origin node, forwarder]
    col_total = sizes.sum(0)
    start = (torch.cumsum(sizes, 0) - sizes) + (torch.cumsum(col_total, 0) - col_total)
    idx = [torch.arange(int(start[n, p]), int(start[n, p] + sizes[n, p]))
           for n in range(nodes) for p in range(per)]
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)


def stage(tp: Transport, x: torch.Tensor, scales: Optional[torch.Tensor],
          topk_idx: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor],
          is_token_in_rank: torch.Tensor) -> Staged:
    """Rows for hop 1, one per (token, destination node), grouped by node (overlaps the header)."""
    per, nodes = tp.topo.ranks_per_node, tp.topo.num_nodes
    in_node = node_membership(is_token_in_rank, per)
    order = send_order(in_node)
    mask = None
    if topk_idx is None:
        # Without top-k ids the forwarder cannot tell which of its node's ranks want the token.
        node_of_row = torch.repeat_interleave(torch.arange(nodes), in_node.sum(0))
        mask = is_token_in_rank.view(-1, nodes, per)[order, node_of_row].to(torch.uint8)
    meta, specs = pack_token_meta(order, topk_idx, topk_weights, scales, extra=mask)
    return Staged(order, gather_rows(tp.workspace, "send_x", wire_view(x), order), meta, specs)


def dispatch(tp: Transport, staged: Staged, x: torch.Tensor, scales: Optional[torch.Tensor],
             topk_idx: Optional[torch.Tensor], is_token_in_rank: torch.Tensor, counts: torch.Tensor,
             src_tokens: Sequence[int], num_experts: int, num_worst_tokens: int,
             expert_alignment: int, num_tokens_per_expert: Optional[torch.Tensor], channels: int,
             buffer_uid: int, *, groups: TopologyGroups, node_counts: torch.Tensor) -> DispatchResult:
    """Two-hop dispatch of :func:`stage`'s rows, same outputs as :func:`flexep.normal.dispatch`."""
    topo = tp.topo
    rank, per, nodes = tp.rank, topo.ranks_per_node, topo.num_nodes
    me_node, me_local = topo.node_of(rank), topo.local_rank_of(rank)
    local = num_experts // tp.world
    rail_members, node_members = topo.rail_ranks(me_local), topo.node_ranks(me_node)

    # Hop 1: one row per (token, destination node) over the rail.
    in_node = node_membership(is_token_in_rank, per)
    rail_order, specs = staged.order, staged.specs
    rail_send = node_counts[rank].tolist()
    rail_recv = node_counts[rail_members, me_node].tolist()
    ws = tp.workspace
    rail_x = ws.get("rail_recv", (sum(rail_recv), x.size(1)), wire_view(x).dtype, x.device)
    rail_meta = staged.meta.new_empty(sum(rail_recv), staged.meta.size(1))
    tp.fault_point("before_payload")
    tp.all_to_all("rail", [staged.x, staged.meta], [rail_x, rail_meta],
                  rail_send, rail_recv, group=groups.rail, role="rail", members=rail_members)

    # Hop 2: forward each rail row to the ranks of this node that want it.
    got = unpack_rows(rail_meta, specs)
    if topk_idx is not None:
        owner = torch.where(got[1] >= 0, torch.div(got[1], local, rounding_mode="floor"), -1)
        want = torch.zeros(owner.size(0), tp.world + 1, dtype=torch.bool)
        want.scatter_(1, torch.where(owner >= 0, owner, tp.world), True)
        want = want[:, me_node * per:(me_node + 1) * per]
    else:
        want = got[1].bool()
    fwd_order = send_order(want.contiguous())
    fwd_send = want.sum(0).tolist()
    fwd_recv = counts[:, rank].view(nodes, per).sum(0).tolist()
    intra_x = ws.get("intra_recv", (sum(fwd_recv), x.size(1)), wire_view(x).dtype, x.device)
    fwd_meta = pack_rows([p for i, p in enumerate(got) if topk_idx is not None or i != 1])
    fwd_specs = [s for i, s in enumerate(specs) if topk_idx is not None or i != 1]
    intra_meta = fwd_meta.new_empty(sum(fwd_recv), fwd_meta.size(1))
    fwd_x = gather_rows(ws, "fwd_send", rail_x, fwd_order)
    tp.all_to_all("intra", [fwd_x, fwd_meta.index_select(0, fwd_order)], [intra_x, intra_meta],
                  fwd_send, fwd_recv, group=groups.intra, role="intra", members=node_members)

    # Reorder to flat order: by global source rank, source token order inside each.
    perm = _intra_perm(counts, rank, topo)
    recv_counts = counts[:, rank].tolist()
    num_recv = sum(recv_counts)
    rows = max(num_recv, num_worst_tokens)
    recv_x = padded_rows(x, rows, num_recv)
    torch.index_select(intra_x, 0, perm, out=wire_view(recv_x[:num_recv]))
    fields = unpack_rows(intra_meta.index_select(0, perm), fwd_specs)
    recv = finish_receive(tp, fields, rows, num_recv, topk_idx, scales, num_experts, num_worst_tokens,
                          expert_alignment, num_tokens_per_expert)
    src_meta = torch.zeros(rows, 8, dtype=torch.uint8)
    src_rank = torch.repeat_interleave(torch.arange(tp.world), torch.tensor(recv_counts))
    src_meta[:num_recv, 0] = (src_rank // per).to(torch.uint8)
    src_meta[:num_recv, 1] = (src_rank % per).to(torch.uint8)
    rail_src_tokens = [src_tokens[r] for r in rail_members]
    plan = HierPlan(
        topo=topo, groups=groups, rail_order=rail_order, rail_send=tuple(rail_send),
        rail_recv=tuple(rail_recv), fwd_order=fwd_order, fwd_send=tuple(fwd_send),
        fwd_recv=tuple(fwd_recv), perm=perm, mask_bytes=0 if topk_idx is not None else per,
        deepep=(channel_prefix(in_node, channels),
                recv_channel_prefix(got[0].view(-1), rail_recv, rail_src_tokens, channels),
                torch.tensor(rail_recv, dtype=torch.int32).cumsum(0, dtype=torch.int32),
                torch.tensor(recv_counts, dtype=torch.int32).cumsum(0, dtype=torch.int32),
                src_meta,
                position_in_group(in_node),
                position_in_group(want)))
    handle = NormalHandle(
        rank_prefix_matrix=counts.to(torch.int32).cumsum(0, dtype=torch.int32),
        channel_prefix_matrix=channel_prefix(is_token_in_rank, channels),
        recv_channel_prefix_matrix=recv_channel_prefix(recv.src_idx, recv_counts, src_tokens, channels),
        recv_src_idx=recv.src_idx, is_token_in_rank=is_token_in_rank,
        send_head=position_in_group(is_token_in_rank),
        send_order=send_order(is_token_in_rank), send_counts=tuple(counts[rank].tolist()),
        recv_counts=tuple(recv_counts), num_recv_tokens=num_recv, hidden=x.size(1),
        buffer_uid=buffer_uid, hier=plan)
    return DispatchResult(recv_x, recv.scales, recv.topk_idx, recv.topk_weights, recv.counts, handle)


def _two_hops(tp: Transport, plan: HierPlan, tensors: Sequence[torch.Tensor],
              outs: Sequence[torch.Tensor]) -> None:
    """Replay both dispatch hops for row-aligned ``tensors [T, ...]`` into ``outs [M, ...]``.

    Intermediate rows live in the workspace, as in :func:`dispatch`; the final reorder writes
    straight into ``outs``.
    """
    rail_members, node_members = plan.members(tp.rank)
    ws = tp.workspace

    def name(base: str, i: int) -> str:  # the data rows share dispatch's scratch buffers
        return base if i == 0 else f"{base}{i}"

    rail_in = [gather_rows(ws, name("send_x", i), wire_view(t), plan.rail_order)
               for i, t in enumerate(tensors)]
    rail_out = [ws.get(name("rail_recv", i), (sum(plan.rail_recv), *t.shape[1:]), t.dtype, t.device)
                for i, t in enumerate(rail_in)]
    tp.all_to_all("rail", rail_in, rail_out, plan.rail_send, plan.rail_recv,
                  group=plan.groups.rail, role="rail", members=rail_members)
    fwd_in = [gather_rows(ws, name("fwd_send", i), t, plan.fwd_order) for i, t in enumerate(rail_out)]
    fwd_out = [ws.get(name("intra_recv", i), (sum(plan.fwd_recv), *t.shape[1:]), t.dtype, t.device)
               for i, t in enumerate(fwd_in)]
    tp.all_to_all("intra", fwd_in, fwd_out, plan.fwd_send, plan.fwd_recv,
                  group=plan.groups.intra, role="intra", members=node_members)
    for src, out in zip(fwd_out, outs):
        torch.index_select(src, 0, plan.perm, out=wire_view(out))


def cached_dispatch(tp: Transport, x: torch.Tensor, scales: Optional[torch.Tensor],
                    handle: NormalHandle) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Send ``x`` (and scales) along a hierarchical handle's routing."""
    rows, num_recv = handle.num_rows, handle.num_recv_tokens
    recv_x = padded_rows(x, rows, num_recv)
    tensors, outs = [x], [recv_x[:num_recv]]
    recv_scales = None
    if scales is not None:
        recv_scales = torch.zeros(rows, scales.size(1), dtype=scales.dtype)
        tensors.append(scales.contiguous())
        outs.append(recv_scales[:num_recv])
    tp.fault_point("before_payload")
    _two_hops(tp, handle.hier, tensors, outs)
    return recv_x, recv_scales


def combine(tp: Transport, x: torch.Tensor, handle: NormalHandle,
            topk_weights: Optional[torch.Tensor], bias: Sequence[torch.Tensor]
            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Reduce inside each node, cross the network once per (token, node), reduce at the source."""
    plan: HierPlan = handle.hier
    rail_members, node_members = plan.members(tp.rank)
    num_recv = handle.num_recv_tokens
    inverse = torch.empty_like(plan.perm)
    inverse[plan.perm] = torch.arange(plan.perm.numel())
    tensors = [x[:num_recv]] + ([topk_weights[:num_recv]] if topk_weights is not None else [])
    ws = tp.workspace
    tp.fault_point("before_payload")
    # Hop 2 backwards: rows return to their forwarders in the order those sent them.
    back = [gather_rows(ws, f"back{i}", t, inverse) for i, t in enumerate(tensors)]
    at_fwd = [ws.get(f"at_fwd{i}", (sum(plan.fwd_send), t.size(1)), t.dtype, t.device)
              for i, t in enumerate(back)]
    tp.all_to_all("intra", back, at_fwd, plan.fwd_recv, plan.fwd_send, group=plan.groups.intra,
                  role="intra", members=node_members)
    # Partial sum per rail row over this node's ranks; rounded to the wire dtype like DeepEP.
    partial = [sum_blocks(t, plan.fwd_order, plan.fwd_send, sum(plan.rail_recv), (), ws,
                          out=ws.get(f"partial{i}", (sum(plan.rail_recv), t.size(1)), t.dtype, t.device))
               for i, t in enumerate(at_fwd)]
    # Hop 1 backwards: one partial per (token, node) crosses the network.
    at_src = [ws.get(f"at_src{i}", (sum(plan.rail_send), t.size(1)), t.dtype, t.device)
              for i, t in enumerate(partial)]
    tp.all_to_all("rail", partial, at_src, plan.rail_recv, plan.rail_send, group=plan.groups.rail,
                  role="rail", members=rail_members)
    out = sum_blocks(at_src[0], plan.rail_order, plan.rail_send, handle.num_tokens, bias, ws)
    combined_w = None
    if topk_weights is not None:
        combined_w = sum_blocks(at_src[1], plan.rail_order, plan.rail_send, handle.num_tokens)
    return out, combined_w
