"""The inter-node floor of ``flexep bench``: rows per (token, node) from the routing, the busiest
node, the link rate from flags, environment or a netbed state file; checked by hand."""

import pytest
import torch

from flexep.cli.netfloor import LinkRate, inter_node_floor, link_rate, node_rows


def test_node_rows_counts_one_row_per_token_and_node():
    # 4 ranks, 2 per node. Token 0 -> ranks 0 and 1 (node 0 once), token 1 -> ranks 1 and 3
    # (both nodes), token 2 -> nowhere, token 3 -> ranks 2 and 3 (node 1 once).
    in_rank = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert node_rows(in_rank, 2) == [2, 2]
    assert node_rows(in_rank, 1) == [1, 2, 1, 2]
    with pytest.raises(ValueError, match="multiple of ranks_per_node"):
        node_rows(in_rank, 3)


def test_floor_of_a_hand_computed_routing():
    # 2 nodes x 2 ranks; rows[r][n] = (token, node) rows rank r needs on node n.
    rows = [[9, 3], [9, 4],      # node 0 sends 3 + 4 = 7 rows to node 1
            [5, 9], [6, 9]]      # node 1 sends 5 + 6 = 11 rows to node 0
    rate = LinkRate(gbit=0.0008, paths=2, source="test")  # 2 x 100 kB/s = 200 kB/s per direction
    f = inter_node_floor(rows, 2, dispatch_row_bytes=1000, combine_row_bytes=500, rate=rate)
    assert (f.rows_out, f.rows_in) == ((7, 11), (11, 7))
    assert (f.rows, f.busiest_node) == (11, 0)  # node 0 receives 11 (and node 1 sends them)
    assert (f.dispatch_bytes, f.combine_bytes) == (11_000, 5_500)
    assert f.dispatch_s == pytest.approx(11_000 / 200_000)
    assert f.total_s == pytest.approx(0.055 + 0.0275)
    # Intra-node rows (the diagonal blocks) never count; no rate, no time.
    f = inter_node_floor([[100, 1], [2, 100]], 1, 10, 10)
    assert (f.rows, f.dispatch_bytes, f.total_s) == (2, 20, None)


def test_floor_of_three_nodes_takes_the_busiest_direction():
    # 3 nodes x 1 rank: node 2 receives 4 + 6 = 10, more than anyone sends (node 1: 2 + 6 = 8).
    rows = [[0, 1, 4], [2, 0, 6], [3, 0, 0]]
    f = inter_node_floor(rows, 1, 1, 1)
    assert (f.rows_out, f.rows_in, f.rows, f.busiest_node) == ((5, 8, 3), (5, 1, 10), 10, 2)


def test_link_rate_from_flags_environment_and_netbed_state(tmp_path):
    assert link_rate(0.25, 2, env={}) == LinkRate(0.25, 2, "flags")
    assert link_rate(1.0, env={"NETBED_PATHS": "4"}).paths == 4
    assert link_rate(env={"NETBED_GBIT": "0.5", "NETBED_PATHS": "2"}) == \
        LinkRate(0.5, 2, "NETBED_GBIT/NETBED_PATHS")
    (tmp_path / "tb.state").write_text("nodes=2\ngbit=0.25\npaths=2\nnamespace=tb-n0\ncomplete=1\n")
    env = {"NETBED_NAME": "tb", "NETBED_STATE_DIR": str(tmp_path)}
    assert link_rate(env=env) == LinkRate(0.25, 2, "netbed testbed 'tb'")
    assert link_rate(env={"NETBED_NAME": "absent", "NETBED_STATE_DIR": str(tmp_path)}) is None
    assert link_rate(env={}) is None
    assert LinkRate(0.25, 2, "x").bytes_per_s == pytest.approx(62.5e6)
    with pytest.raises(ValueError, match="gbit > 0"):
        link_rate(0.0, 1, env={})


@pytest.mark.ranks
def test_bench_reports_the_floor_of_its_routing():
    from flexep.cli.bench import BenchConfig, _routing, format_table, run_bench

    cfg = BenchConfig(world=4, tokens=24, hidden=256, experts=16, topk=4, iters=1, warmup=0,
                      ranks_per_node=2, channels=(1,), link_gbit=0.1, paths=2)
    summary = run_bench(cfg)
    # Independent count: the node of expert e is e // (experts per node); one row per (token, remote node).
    out, into = [0, 0], [0, 0]
    for r in range(4):
        topk = _routing(cfg, r, torch.device("cpu"))[1]
        for token in topk.tolist():
            for node in {e // 8 for e in token if e >= 0} - {r // 2}:
                out[r // 2] += 1
                into[node] += 1
    f = summary["inter_node_floor"]
    assert (f["rows_out"], f["rows_in"]) == (out, into)
    assert f["rows"] == max(max(out), max(into))
    assert f["total_s"] == pytest.approx(f["rows"] * (256 * 2 + 256 * 2) / (2 * 0.1e9 / 8))
    assert set(f["vs_floor"]) == {"hier c1", "flat c1", "raw flat a2a"}
    text = format_table(summary)
    assert "Inter-node floor" in text and "2 path(s) x 0.1 Gbit/s (flags)" in text
