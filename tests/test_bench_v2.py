"""``flexep bench --api v2`` end to end on small shapes: every V2 path runs, checks itself, and
reports its bytes against the routing's minimum and the counted path."""

import json

import pytest

from flexep.cli.bench import main

pytestmark = pytest.mark.ranks


def test_api_v2_times_every_v2_path_beside_v1(capsys, tmp_path):
    """V1 and the four V2 paths, each checked before timing; counted paths send the routing's
    minimum; sync-free ones send more, allocate W * T rows, and the table says so."""
    path = tmp_path / "v2.json"
    assert main(["--api", "v2", "--world", "2", "--tokens", "16", "--hidden", "256", "--experts", "8",
                 "--topk", "2", "--iters", "1", "--warmup", "0", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for row in ("v1", "v2 counted", "v2 counted expanded", "v2 sync-free", "v2 sync-free expanded"):
        assert f"\n{row} " in out, row
    v = {r["name"]: r for r in json.loads(path.read_text())["variants"]}
    for name in ("v1", "v2 counted", "v2 counted expanded"):
        for op in ("dispatch", "combine"):
            assert v[name][f"{op}_payload"] == v[name][f"{op}_minimum"] > 0, (name, op)
        assert v[name]["rows_out"] == v[name]["rows_used"] > 0
    for name in ("v2 sync-free", "v2 sync-free expanded"):
        counted = v[name.replace("sync-free", "counted")]
        assert v[name]["dispatch_payload"] >= v[name]["dispatch_minimum"] > 0
        assert v[name]["rows_out"] > v[name]["rows_used"] == counted["rows_used"]
        assert v[name]["extra_bytes"] == sum(v[name][f"{op}_payload"] - counted[f"{op}_payload"]
                                             for op in ("dispatch", "combine"))
    assert v["v2 sync-free"]["rows_out"] == 2 * 16  # W * T rows


@pytest.mark.unit
def test_quick_without_tokens_uses_the_default_then_shrinks():
    """``flexep bench --api v2 --quick`` (no ``--tokens``) shrinks the default shape."""
    import argparse

    from flexep.cli import bench, bench_v2

    parser = argparse.ArgumentParser()
    bench.add_args(parser)
    quick = bench_v2.config_from_args(parser.parse_args(["--api", "v2", "--quick"]))
    assert (quick.tokens, quick.hidden, quick.iters) == (128, 2048, 2)
    full = bench_v2.config_from_args(parser.parse_args(["--api", "v2"]))
    assert full.tokens == bench_v2.V2BenchConfig.tokens == 512
