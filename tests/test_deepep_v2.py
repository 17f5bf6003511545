"""DeepEP's own V2 test logic (``tests/elastic/test_ep.py``) on flexep, at world 1, 2, 4 and on
two virtual nodes: see :mod:`deepep_v2_port` for what is ported and what changes.

Each world size is one spawn running several configurations (DeepEP's command-line variants:
``--do-cpu-sync 0``, ``--allow-multiple-reduction 0``, ``--allow-hybrid-mode 0``,
``--deterministic``, ``--masked-ratio``, V2.5's ``--defer-epilogue``). Every configuration runs a
strided slice of DeepEP's 144-case grid (72/36 for V2.5) chosen so that, together, every value of
every grid dimension is exercised; every case runs DeepEP's five calls and all its assertions.
"""

from __future__ import annotations

import pytest
from deepep_v2_port import Config, enumerate_ep_modes, run_many

from flexep.launch import run_local

pytestmark = pytest.mark.ranks


def _every(step: int, version: str = "2.0", defer: bool = True, offset: int = 0) -> tuple:
    total = len(list(enumerate_ep_modes(version, defer)))
    return tuple(range(offset, total, step))


WORLD1 = {
    "v2.0 cpu-sync": Config(cases=_every(9)),
    "v2.0 sync-free": Config(do_cpu_sync=False, cases=_every(11, offset=3)),
}
WORLD2 = {
    "v2.0 cpu-sync": Config(cases=_every(5)),
    "v2.0 sync-free": Config(do_cpu_sync=False, cases=_every(7, offset=2)),
    "v2.0 no multiple reduction": Config(allow_multiple_reduction=False, cases=_every(11, offset=1)),
    "v2.5 defer, masked, deterministic": Config(version="2.5", masked_ratio=0.3, deterministic=True,
                                                cases=_every(3, "2.5")),
    "v2.5 sync-free, no defer": Config(version="2.5", defer_epilogue=False, do_cpu_sync=False,
                                       cases=_every(9, "2.5", False, offset=4)),
}
WORLD4 = {
    "v2.5 cpu-sync": Config(version="2.5", cases=_every(12, "2.5")),
    "v2.0 sync-free": Config(do_cpu_sync=False, cases=_every(19, offset=5)),
    "2x2 hybrid": Config(ranks_per_node=2, cases=_every(17)),
    "2x2 hybrid sync-free, no multiple reduction": Config(ranks_per_node=2, do_cpu_sync=False,
                                                          allow_multiple_reduction=False,
                                                          cases=_every(23, offset=6)),
    "2x2 not hybrid": Config(ranks_per_node=2, allow_hybrid_mode=False, masked_ratio=0.2,
                             cases=_every(29, offset=8)),
}
SPAWNS = {1: WORLD1, 2: WORLD2, 4: WORLD4}


@pytest.fixture(scope="module")
def results():
    """One spawn per world size (lazily, so ``-k`` selects spawns)."""
    cache: dict = {}

    def get(world: int) -> list:
        if world not in cache:
            cache[world] = run_local(run_many, world, (SPAWNS[world],), timeout=600)
        return cache[world]
    return get


@pytest.mark.parametrize("world,name", [(w, n) for w, cfgs in SPAWNS.items() for n in cfgs])
def test_deepep_v2_cases(results, world, name):
    counts = [r[name] for r in results(world)]
    assert counts == [len(SPAWNS[world][name].cases)] * world


def test_grid_slices_cover_every_value():
    """Together the slices exercise every value of every grid dimension (per version)."""
    for version in ("2.0", "2.5"):
        picked = [mode for spawn in SPAWNS.values() for cfg in spawn.values() if cfg.version == version
                  for case, mode in enumerate(enumerate_ep_modes(version, cfg.defer_epilogue))
                  if case in cfg.cases]
        full = list(enumerate_ep_modes(version, False))
        for dim in range(7):
            assert {m[dim] for m in picked} == {m[dim] for m in full}, (version, dim)
