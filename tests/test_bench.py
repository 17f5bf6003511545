"""``flexep bench`` (normal mode) end to end on small shapes: it runs, checks itself, and reports
bytes that match the routing's minimum."""

import argparse
import json

import pytest
import torch
import torch.distributed as dist

from flexep.accounting import routing_traffic, wire_row_bytes
from flexep.cli.bench import BenchConfig, _routing, format_table, main, parse_channels, run_bench
from flexep.topology import Topology

pytestmark = pytest.mark.ranks

LINKS = ("local", "intra", "inter")


def _bytes(variant, op, field):
    return sum(variant[f"{op}_{link}_{field}"] for link in LINKS)


def test_cli_prints_table_and_writes_json(tmp_path, capsys, gloo_world1):
    # An initialised default group in the calling process (here the fixture's) must survive.
    path = tmp_path / "bench.json"
    assert main(["--world", "2", "--tokens", "16", "--hidden", "256", "--experts", "8", "--topk", "4",
                 "--iters", "2", "--warmup", "0", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    # The Buffer's default channel count on one machine is 1.
    for row in ("dispatch (flat c1, default)", "combine (flat c1, default)", "raw all_to_all_single",
                "naive per-(token,expert)", "CPU time", "than raw all_to_all_single of the same bytes"):
        assert row in out, row
    summary = json.loads(path.read_text())
    (variant,) = summary["variants"]
    # An independent count from the bench's own routing (the same seeds, no flexep call).
    cfg = BenchConfig(world=2, tokens=16, hidden=256, experts=8, topk=4)
    topks = [_routing(cfg, r, torch.device("cpu"))[1] for r in range(2)]
    topo = Topology(2, 2)
    dispatch_row = wire_row_bytes(256, torch.bfloat16, topk_ids=4, topk_weights=4, src_index=True)
    for op, row in (("dispatch", dispatch_row), ("combine", wire_row_bytes(256, torch.bfloat16))):
        want = routing_traffic(topks, 8, topo, row, hierarchical=False)
        assert _bytes(variant, op, "bytes") == _bytes(variant, op, "min") == \
            want["local"] + want["intra"] + want["inter"], op
        assert {f"flat c1, default {op}", "raw_dispatch", "naive"} <= set(summary["times_s"]), op
    assert dist.is_initialized() and dist.group.WORLD is gloo_world1


def test_channels_option():
    assert parse_channels("default,1,4") == (None, 1, 4)
    assert parse_channels("2,2,auto") == (2, None)
    for bad in ("0", "x", "1,,2", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive counts or 'default'"):
            parse_channels(bad)
    # On one machine the default resolves to 1: asking for it and for 1 times one Buffer.
    cfg = BenchConfig(world=2, tokens=8, hidden=64, experts=4, topk=2, iters=1, warmup=0,
                      channels=(None, 1, 2))
    assert [v["name"] for v in run_bench(cfg)["variants"]] == ["flat c1, default", "flat c2"]


def test_hierarchical_variants_send_fewer_inter_node_bytes():
    cfg = BenchConfig(world=4, tokens=32, hidden=128, experts=16, topk=4, iters=1, warmup=0,
                      ranks_per_node=2, channels=(1, 2), fp8=True)
    summary = run_bench(cfg)
    names = [v["name"] for v in summary["variants"]]
    assert names == ["hier c1", "hier c2", "flat c1", "flat c2"]
    for v in summary["variants"]:
        for op in ("dispatch", "combine"):
            assert _bytes(v, op, "bytes") == _bytes(v, op, "min"), (v["name"], op)
    hier, flat = summary["variants"][0], summary["variants"][2]
    assert 0 < hier["dispatch_inter_bytes"] < flat["dispatch_inter_bytes"]
    assert "fewer inter-node dispatch bytes than flat" in format_table(summary)


def test_no_checks_builds_the_timed_buffers_without_checks(tmp_path, capsys):
    """``--no-checks`` reaches the Buffers (read back from them), still sends the minimum, and the
    header says so; by default both checks are on."""
    for flag, want in (([], (True, None)), (["--no-checks"], (False, False))):
        path = tmp_path / f"bench{len(flag)}.json"
        assert main(["--world", "2", "--tokens", "16", "--hidden", "128", "--experts", "8", "--topk", "4",
                     "--iters", "1", "--warmup", "0", "--json", str(path), *flag]) == 0
        (variant,) = json.loads(path.read_text())["variants"]
        assert (variant["check_consistency"], variant["validate"]) == want
        assert ("checks off" in capsys.readouterr().out) == bool(flag)
        for op in ("dispatch", "combine"):
            assert _bytes(variant, op, "bytes") == _bytes(variant, op, "min") > 0
    assert main(["--mode", "low-latency", "--no-checks"]) == 2
