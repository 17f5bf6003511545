"""Traffic accounting: the minimum comes from the routing alone, so a wasteful algorithm shows.

* worked examples of :func:`flat_minimum`, :func:`hierarchical_minimum` and ``wire_row_bytes``;
* a correct but wasteful algorithm (every row sent twice) keeps exact outputs and reports
  ``sent / minimum = 2``: the comparison can fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import flexep
from flexep.algorithms.contract import Dispatched, NormalHandle
from flexep.algorithms.flat import Flat, FlatRoute, finish_receive
from flexep.algorithms.packing import padded_rows, unpack_rows
from flexep.comm.accounting import flat_minimum, hierarchical_minimum, wire_row_bytes
from flexep.comm.topology import Topology
from flexep.launch import run_local
from flexep.reference import ref_dispatch


def test_wire_row_bytes_worked_example():
    assert wire_row_bytes(7168, torch.bfloat16, topk_ids=8, topk_weights=8, src_index=True) == 14436
    assert wire_row_bytes(7168, torch.uint8, scales=(56, torch.float32)) == 7168 + 224
    assert wire_row_bytes(16, torch.float32, topk_weights=2, mask_bytes=3) == 64 + 8 + 3


def test_flat_minimum_worked_example():
    # counts[s, d]: rank 0 sends 2 rows to itself, 3 to rank 1 (other node), 1 to rank 2 (...).
    counts = torch.tensor([[2, 3, 1, 0], [1, 0, 0, 0], [4, 0, 0, 0], [0, 0, 0, 5]])
    topo = Topology(4, 2)
    assert flat_minimum(counts, topo, 0, 10) == {"local": 20, "intra": 30, "inter": 10}
    # combine: rank 0 returns what each source sent it: 2 (itself), 1 (rank 1), 4 (rank 2).
    assert flat_minimum(counts, topo, 0, 10, reverse=True) == {"local": 20, "intra": 10, "inter": 40}


def test_hierarchical_minimum_worked_example():
    # 2 nodes x 2 ranks. Rank 0's tokens: 3 reach node 0, 2 reach node 1 (entering at rank 2).
    topo = Topology(4, 2)
    counts = torch.tensor([[1, 2, 2, 1], [0, 0, 0, 0], [0, 3, 0, 0], [0, 0, 0, 0]])
    node_counts = torch.tensor([[3, 2], [0, 0], [3, 0], [0, 0]])
    got = hierarchical_minimum(counts, node_counts, topo, 0, 10)
    # rail: 3 rows to itself (local), 2 to rank 2 (inter); forward inside node 0 from rank 0:
    # rows of its rail {0, 2} for rank 0 (1 + 0, local) and rank 1 (2 + 3, intra).
    assert got == {"local": 30 + 10, "intra": 50, "inter": 20}


class _Wasteful(Flat):
    """Flat dispatch that sends every row twice and keeps the first copy: correct, 2x the bytes."""

    def dispatch(self, req, staged, header, expert_counts):
        tp, rank = self.tp, self.tp.rank
        send, recv = header.counts[rank].tolist(), header.counts[:, rank].tolist()
        starts = torch.tensor([0, *send]).cumsum(0)
        twice = torch.cat([torch.arange(starts[d], starts[d + 1]).repeat(2) for d in range(len(send))])
        num_recv = sum(recv)
        got_x = staged.x.new_empty(2 * num_recv, staged.x.size(1))
        got_meta = staged.meta.new_empty(2 * num_recv, staged.meta.size(1))
        tp.all_to_all("payload", [staged.x[twice], staged.meta[twice]], [got_x, got_meta],
                      [2 * n for n in send], [2 * n for n in recv])
        rstarts = torch.tensor([0, *recv]).cumsum(0)
        first = torch.cat([torch.arange(2 * rstarts[s], 2 * rstarts[s] + recv[s]) for s in range(len(recv))])
        recv_x = padded_rows(req.x, num_recv, num_recv)
        recv_x.copy_(got_x[first])
        fields = unpack_rows(got_meta[first], staged.specs)
        got = finish_receive(fields, num_recv, num_recv, req, rank, tp.world)
        handle = NormalHandle(is_token_in_rank=req.is_token_in_rank, recv_src_idx=got.src_idx,
                              counts=header.counts, src_tokens=tuple(header.field("num_tokens")), rank=rank,
                              num_recv_tokens=num_recv, hidden=req.x.size(1), owner=self.owner,
                              route=FlatRoute(staged.order, tuple(send), tuple(recv)))
        return Dispatched(recv_x, None, got.topk_idx, got.topk_weights, expert_counts, handle)


def _worker(rank: int, world: int) -> dict:
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(12, 64, generator=gen)
    topk = torch.rand(12, 8, generator=gen).topk(3, 1).indices
    w = torch.rand(12, 3, generator=gen)
    out = {"x": x, "topk": topk}
    for name in ("flat", "wasteful"):
        buf = flexep.Buffer(dist.group.WORLD, timeout=30)
        if name == "wasteful":
            buf.comm.normal = _Wasteful(buf.comm.transport, buf.comm.uid)
        lay = buf.get_dispatch_layout(topk, 8)
        recv_x, *_ = buf.dispatch(x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3],
                                  num_tokens_per_expert=lay[2], topk_idx=topk, topk_weights=w)
        out[name] = dict(recv_x=recv_x, ratio=buf.last_traffic.ratio(), payload=buf.last_traffic.payload,
                         minimum=buf.last_traffic.minimum)
    return out


@pytest.mark.ranks
def test_a_duplicated_row_shows_in_the_ratio():
    world = 2
    got = run_local(_worker, world, timeout=120)
    ref = ref_dispatch([g["x"] for g in got], [g["topk"] for g in got], 8)
    for r in range(world):
        for name in ("flat", "wasteful"):  # both are correct...
            assert torch.equal(got[r][name]["recv_x"], ref[r].recv_x), (r, name)
        # ...but only one sends the minimum; the other sends every row twice.
        assert got[r]["flat"]["ratio"] == 1.0
        assert got[r]["wasteful"]["minimum"] == got[r]["flat"]["minimum"]
        assert got[r]["wasteful"]["ratio"] == pytest.approx(2.0)
        assert got[r]["wasteful"]["payload"]["intra"] == 2 * got[r]["flat"]["payload"]["intra"]
