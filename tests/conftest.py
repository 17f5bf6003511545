"""Shared fixtures: a one-rank Gloo group for cheap single-process API tests."""

from __future__ import annotations

import inspect
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from flexep.launch import free_port  # noqa: E402

# The rank processes run with one intra-op thread (flexep.launch); the single-process references
# that tests compare with them bit for bit must too: with several threads BLAS splits a matrix
# product's rows between them and small shares round differently (flexep/moe/experts.py).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def gloo_world1():
    """An initialised one-rank Gloo default group (destroyed at session end)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1)
    yield dist.group.WORLD


# ---- tiers: a fast pure tier first, then slow pure checks, multi-rank tests, fault injection ----
TIERS = ("unit", "slow", "ranks", "faults")


def pytest_configure(config):
    for tier, what in zip(TIERS, ("fast, single process, no spawned ranks (the edit loop: pytest -m unit)",
                                  "single process but slow (model fits, compilation, python -O)",
                                  "spawns Gloo ranks; results against the oracle",
                                  "spawns ranks and injects failures (kills, stalls, corruption)")):
        config.addinivalue_line("markers", f"{tier}: {what}")


def _tier(item) -> int:
    for i, tier in enumerate(TIERS[1:], start=1):
        if item.get_closest_marker(tier) is not None:
            return i
    return 0


def _spawns(item) -> bool:
    """The test's own body starts processes (ranks or a command)."""
    try:
        source = inspect.getsource(item.function)
    except (OSError, TypeError):
        return False
    return any(call in source for call in ("run_local(", "subprocess.", "run_ranks("))


def pytest_collection_modifyitems(config, items):
    """Unmarked tests are the unit tier, unless they spawn processes (then ranks); run the tiers
    in order, keeping file order inside."""
    for item in items:
        if _tier(item) == 0:
            item.add_marker("ranks" if _spawns(item) else "unit")
    items.sort(key=_tier)  # stable: file and definition order inside a tier
