"""Shared fixtures: a one-rank Gloo group for cheap single-process API tests."""

from __future__ import annotations

import os
import sys

import pytest
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from flexep.launch import free_port  # noqa: E402


@pytest.fixture(scope="session")
def gloo_world1():
    """An initialised one-rank Gloo default group (destroyed at session end)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1)
    yield dist.group.WORLD
