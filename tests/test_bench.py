"""``flexep bench`` (normal mode) end to end on small shapes: it runs, checks itself, and reports
bytes that match the routing's minimum."""

import json

import torch.distributed as dist

from flexep.cli.bench import BenchConfig, format_table, main, run_bench

LINKS = ("local", "intra", "inter")


def _bytes(variant, op, field):
    return sum(variant[f"{op}_{link}_{field}"] for link in LINKS)


def test_cli_prints_table_and_writes_json(tmp_path, capsys, gloo_world1):
    # An initialised default group in the calling process (here the fixture's) must survive.
    path = tmp_path / "bench.json"
    assert main(["--world", "2", "--tokens", "16", "--hidden", "256", "--experts", "8", "--topk", "4",
                 "--iters", "2", "--warmup", "0", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for row in ("dispatch (flat c1)", "combine (flat c1)", "raw all_to_all_single",
                "naive per-(token,expert)", "CPU time", "than raw all_to_all_single of the same bytes"):
        assert row in out, row
    summary = json.loads(path.read_text())
    (variant,) = summary["variants"]
    for op in ("dispatch", "combine"):
        assert _bytes(variant, op, "bytes") == _bytes(variant, op, "min") > 0
        assert summary["times_s"][f"flat c1 {op}"] > 0 and summary["cpu_s"][f"flat c1 {op}"] >= 0
    assert summary["ratio_vs_raw"] > 0 and summary["ratio_vs_naive"] > 0
    assert dist.is_initialized() and dist.group.WORLD is gloo_world1


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
