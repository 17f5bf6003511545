"""Default channel count (``num_channels=None``): the rule by hand, the environment, the machine
id that tells netbed's namespaces and real hosts from virtual nodes, and a Buffer using it."""

import shutil
import subprocess
import sys

import pytest

from flexep.comm.channels import AUTO, MAX_CHANNELS, auto_channels, host_id, net_paths, requested_channels
from flexep.comm.topology import Topology
from flexep.launch import run_local


def _ids(world: int, per: int, machines_per_node: int = 1) -> list[int]:
    """Host ids for node-major ranks: node n on machine n (or all on one machine when 0)."""
    return [100 + (r // per if machines_per_node else 0) for r in range(world)]


@pytest.mark.parametrize("world, per, hierarchical, paths, expect", [
    (4, 2, True, 2, 4),     # 2 connections per channel between the nodes: 8 flows / 2
    (4, 2, False, 2, 2),    # flat: 4 connections per channel
    (4, 1, True, 2, 8),     # one rail: 8 channels
    (4, 2, True, 1, 2),     # one path: 4 flows
    (8, 4, True, 2, 2),
    (16, 8, True, 2, 1),    # 8 rails already give 8 flows
    (4, 1, True, 4, MAX_CHANNELS),  # 16 flows wanted, capped
])
def test_gloo_across_machines(world, per, hierarchical, paths, expect):
    assert auto_channels(Topology(world, per), _ids(world, per), "gloo", hierarchical, paths) == expect


def test_one_channel_where_extra_groups_do_not_help():
    two_by_two = Topology(4, 2)
    assert auto_channels(Topology(4, 4), _ids(4, 4), "gloo", True, 2) == 1  # one node
    assert auto_channels(two_by_two, _ids(4, 2, 0), "gloo", True, 2) == 1  # virtual nodes
    assert auto_channels(two_by_two, _ids(4, 2), "nccl", True, 2) == 1
    assert auto_channels(two_by_two, _ids(4, 2), "cpu:gloo,cuda:nccl", True, 2) == 1
    # One machine shared by two nodes is enough to make them virtual.
    assert auto_channels(two_by_two, [1, 1, 1, 2], "gloo", True, 2) == 1


def test_request_and_environment(monkeypatch):
    monkeypatch.delenv("FLEXEP_NUM_CHANNELS", raising=False)
    monkeypatch.delenv("FLEXEP_NET_PATHS", raising=False)
    assert requested_channels(None) == AUTO
    assert requested_channels(3) == 3
    assert net_paths() == 2
    monkeypatch.setenv("FLEXEP_NUM_CHANNELS", "5")
    monkeypatch.setenv("FLEXEP_NET_PATHS", "3")
    assert (requested_channels(None), requested_channels(2), net_paths()) == (5, 2, 3)
    for bad, err, msg in [(0, ValueError, "num_channels must be >= 1, got 0"),
                          (2.0, TypeError, "num_channels must be an int or None, got float"),
                          (True, TypeError, "num_channels must be an int or None, got bool")]:
        with pytest.raises(err, match=msg):
            requested_channels(bad)
    monkeypatch.setenv("FLEXEP_NUM_CHANNELS", "four")
    with pytest.raises(ValueError, match="FLEXEP_NUM_CHANNELS must be a positive integer, got 'four'"):
        requested_channels(None)
    monkeypatch.setenv("FLEXEP_NET_PATHS", "0")
    with pytest.raises(ValueError, match="FLEXEP_NET_PATHS must be >= 1, got 0"):
        net_paths()


def test_host_id_is_stable_and_62_bits():
    a = host_id()
    assert a == host_id() and 0 <= a < 1 << 62


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_host_id_differs_in_another_network_namespace():
    """netbed's nodes are network namespaces of one host: their ids must differ."""
    code = "from flexep.comm.channels import host_id; print(host_id())"
    same = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    other = subprocess.run(["unshare", "--net", sys.executable, "-c", code], capture_output=True,
                           text=True, timeout=60)
    if other.returncode != 0:
        pytest.skip(f"network namespaces not allowed here: {other.stderr.strip()[-200:]}")
    assert int(same.stdout) == host_id()
    assert int(other.stdout) != host_id()


def _buffer_channels(rank: int, world: int, env: dict) -> list:
    import os

    import torch.distributed as dist

    import flexep
    os.environ.update(env)
    got = []
    for kw in (dict(), dict(ranks_per_node=2), dict(ranks_per_node=2, num_channels=3)):
        buf = flexep.Buffer(dist.group.WORLD, explicitly_destroy=True, **kw)
        got.append(buf.num_channels)
        buf.destroy()
    return got


@pytest.mark.ranks
def test_buffer_default_on_one_machine_and_from_the_environment():
    # One machine: virtual nodes keep one channel; an explicit value or the variable wins.
    assert run_local(_buffer_channels, 4, ({},), timeout=120) == [[1, 1, 3]] * 4
    assert run_local(_buffer_channels, 4, ({"FLEXEP_NUM_CHANNELS": "2"},), timeout=120) == [[2, 2, 3]] * 4
