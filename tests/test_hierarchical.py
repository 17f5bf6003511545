"""Hierarchical exchange on virtual nodes: equal to the oracle and to the flat algorithm,
every channel count, and traffic accounting checked against an independent routing count."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from inputs import make_x, routing, weights
from test_normal import check_world

import flexep
from flexep.accounting import routing_traffic
from flexep.launch import run_local
from flexep.topology import Topology

pytestmark = pytest.mark.ranks

HIDDEN = 256
EXPERTS = 32


def test_world4_two_nodes_of_two():
    check_world(4, ranks_per_node=2)


def test_world4_four_nodes_of_one():
    check_world(4, ranks_per_node=1)


def test_world4_one_node_of_four():
    check_world(4, ranks_per_node=4)


def test_world2_two_nodes_of_one():
    check_world(2, ranks_per_node=1)


def _cases(rank: int, world: int, experts: int) -> list[tuple[str, torch.Tensor, object]]:
    """(name, topk_idx, x) for adversarial routings; top-k from 1 to 8."""
    out = []
    for k in (1, 2, 5, 8):
        gen = torch.Generator().manual_seed(100 * k + rank)
        out.append((f"random_k{k}", routing(gen, 24, experts, k, "holes"),
                    make_x(gen, rank, 24, HIDDEN, "fp32")))
    gen = torch.Generator().manual_seed(7 + rank)
    # Every token to node 0 only (its 2 ranks own the first experts): the others receive nothing.
    to_node0 = torch.stack([torch.randperm(2 * experts // world, generator=gen)[:4] for _ in range(20)])
    out.append(("all_to_node0", to_node0, make_x(gen, rank, 20, HIDDEN, "fp32")))
    out.append(("fp8", routing(gen, 16, experts, 4), make_x(gen, rank, 16, HIDDEN, "fp8")))
    return out


def _flat_vs_hier(rank: int, world: int, experts: int = EXPERTS, channels=(1, 2, 3, 4)) -> dict:
    group = dist.group.WORLD
    flat = flexep.Buffer(group, ranks_per_node=2, hierarchical=False)
    hier = {c: flexep.Buffer(group, ranks_per_node=2, num_channels=c) for c in channels}
    assert hier[channels[0]].hierarchical and not flat.hierarchical
    out = {}
    for name, topk, x in _cases(rank, world, experts):
        w = weights(torch.Generator().manual_seed(rank), topk)
        results = {}
        for key, buf in [("flat", flat)] + [(f"hier{c}", b) for c, b in hier.items()]:
            lay = buf.get_dispatch_layout(topk, experts)
            recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
                x, num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1],
                is_token_in_rank=lay[3], num_tokens_per_expert=lay[2], topk_idx=topk, topk_weights=w)
            d_traffic = buf.last_traffic
            y = recv_x if not isinstance(recv_x, tuple) else recv_x[0].float()
            combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w)
            results[key] = dict(recv_x=recv_x, recv_idx=recv_idx, recv_w=recv_w, counts=counts,
                                combined=combined, combined_w=combined_w, rdma=lay[1],
                                d_traffic=d_traffic, c_traffic=buf.last_traffic,
                                handle_len=len(handle),
                                # Rows per source, as DeepEP's tests read them: handle[-4] of an
                                # internode handle, this rank's column of handle[0] otherwise.
                                prefix=handle[-4] if len(handle) == 10 else handle[0][:, rank])
        out[name] = dict(topk=topk, results=results)
    return out


def _bits(t):
    return (t[0].view(torch.uint8), t[1]) if isinstance(t, tuple) else t


def test_hierarchical_equals_flat_every_channel_count():
    _check_flat_vs_hier(4, EXPERTS, (1, 2, 3, 4))


def test_hierarchical_equals_flat_three_nodes():
    # The middle node's own rows sit between the other nodes' in the rail buffers (the ends'
    # own rows are at one end): its combine lands the network partials around them.
    _check_flat_vs_hier(6, 24, (1, 3))


def _check_flat_vs_hier(world: int, experts: int, channels: tuple) -> None:
    per_rank = run_local(_flat_vs_hier, world, (experts, channels), timeout=300)
    topo = Topology(world, 2)
    for name in per_rank[0]:
        topks = [per_rank[r][name]["topk"] for r in range(world)]
        for r in range(world):
            res = per_rank[r][name]["results"]
            flat = res["flat"]
            assert flat["rdma"] is not None and flat["rdma"].shape == (world // 2,)
            for key, got in res.items():
                msg = f"{name} rank {r} {key}"
                # Dispatch is bitwise identical to the flat algorithm.
                for field in ("recv_idx", "recv_w"):
                    assert torch.equal(got[field], flat[field]), msg
                a, b = _bits(got["recv_x"]), _bits(flat["recv_x"])
                assert all(torch.equal(u, v) for u, v in zip(a, b)) if isinstance(a, tuple) \
                    else torch.equal(a, b), msg
                assert got["counts"] == flat["counts"], msg
                assert torch.equal(got["prefix"], flat["prefix"]), msg
                # Combine: same sums in another order (float32), within float tolerance.
                torch.testing.assert_close(got["combined"], flat["combined"], rtol=1e-6, atol=1e-5,
                                           msg=msg)
                torch.testing.assert_close(got["combined_w"], flat["combined_w"], rtol=1e-6, atol=1e-6)
        # Accounting: what the ranks sent equals an independent count from topk_idx.
        row = _row_bytes(per_rank[0][name]["results"]["flat"]["recv_x"], topks[0].size(1))
        for key, hierarchical in (("flat", False), ("hier1", True), ("hier3", True)):
            want = routing_traffic(topks, experts, topo, row, hierarchical)
            for link in ("intra", "inter"):
                sent = sum(per_rank[r][name]["results"][key]["d_traffic"].payload[link]
                           for r in range(world))
                minimum = sum(per_rank[r][name]["results"][key]["d_traffic"].minimum[link]
                              for r in range(world))
                assert sent == minimum == want[link], f"{name} {key} {link}: {sent} {minimum} {want}"
        flat_inter = routing_traffic(topks, experts, topo, row, False)["inter"]
        hier_inter = routing_traffic(topks, experts, topo, row, True)["inter"]
        assert hier_inter <= flat_inter


def _row_bytes(recv_x, k: int) -> int:
    """Dispatch row: data, scales, top-k ids + weights, 4-byte source index."""
    if isinstance(recv_x, tuple):
        return recv_x[0].size(1) + recv_x[1].size(1) * 4 + 12 * k + 4
    return recv_x.size(1) * recv_x.element_size() + 12 * k + 4


def test_hierarchical_cuts_inter_node_bytes_for_dense_routing():
    # Top-8 of 32 experts on 2 nodes: most tokens reach both ranks of a node, so hierarchical
    # sends about half the flat algorithm's inter-node bytes.
    gen = torch.Generator().manual_seed(0)
    topks = [routing(gen, 200, EXPERTS, 8) for _ in range(4)]
    topo = Topology(4, 2)
    flat = routing_traffic(topks, EXPERTS, topo, 100, False)
    hier = routing_traffic(topks, EXPERTS, topo, 100, True)
    assert hier["inter"] < 0.7 * flat["inter"]
    assert hier["inter"] + hier["intra"] + hier["local"] >= flat["inter"] + flat["intra"] + flat["local"]
