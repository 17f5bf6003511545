"""How many channels (parallel connections per pair of ranks) an exchange uses by default.

A channel is one more process group over the same ranks (see :mod:`flexep.comm.transport`).
Across nodes joined by an ECMP fabric each TCP connection is hashed onto one path, and one
connection rarely keeps a path busy, so Gloo needs several flows per path to use the network;
NCCL, HCCL and XCCL spread one communicator over their own channels and queue pairs, and inside
one machine extra channels only add groups. ``num_channels=None`` (the default) therefore means:

* ``FLEXEP_NUM_CHANNELS`` when set;
* else 1 on one node, on virtual nodes (several "nodes" on one machine: same host name and
  network namespace), and on every backend but Gloo;
* else, Gloo across machines: enough channels that each pair of nodes carries
  :data:`FLOWS_PER_PATH` connections per path, ``FLEXEP_NET_PATHS`` paths (default 2) per node.
  A pair of nodes has ``P`` connections per channel in the hierarchical exchange (one per rail)
  and ``P * P`` in the flat one: 2 nodes x 2 ranks, 2 paths, hierarchical -> 4 channels;
  4 nodes x 1 rank -> 8; 1 path -> 2. At most :data:`MAX_CHANNELS`.

Measured on the emulated fabric (docs/benchmarks.md, *Several nodes*): 2 nodes x 2 ranks, 2
paths, 4-8 channels were 1.8-1.9x faster than 1; on 1 path 2 channels gave the whole gain.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Optional

from .topology import Topology

__all__ = ["AUTO", "FLOWS_PER_PATH", "MAX_CHANNELS", "requested_channels", "net_paths", "host_id",
           "auto_channels"]

AUTO = 0  # the agreed code of num_channels=None
FLOWS_PER_PATH = 4
MAX_CHANNELS = 8


def _env_count(name: str) -> Optional[int]:
    """The positive integer in environment variable ``name``, None when unset or empty."""
    env = os.environ.get(name, "").strip()
    if not env:
        return None
    try:
        value = int(env)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {env!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def requested_channels(num_channels) -> int:
    """The agreed request: ``num_channels``, else ``FLEXEP_NUM_CHANNELS``, else :data:`AUTO`.

    Raises ``TypeError``/``ValueError`` naming the argument for anything but a positive int.
    """
    if num_channels is None:
        env = _env_count("FLEXEP_NUM_CHANNELS")
        return AUTO if env is None else env
    if not isinstance(num_channels, int) or isinstance(num_channels, bool):
        raise TypeError(f"num_channels must be an int or None, got {type(num_channels).__name__}")
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    return num_channels


def host_id() -> int:
    """62-bit id of this rank's machine: host name and network namespace (netbed's nodes share
    a host name but not a namespace; virtual nodes share both)."""
    try:
        netns = os.readlink("/proc/self/ns/net")
    except OSError:
        netns = ""
    digest = hashlib.blake2b(f"{socket.gethostname()}|{netns}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def net_paths() -> int:
    """Parallel inter-node paths per node: ``FLEXEP_NET_PATHS``, default 2."""
    paths = _env_count("FLEXEP_NET_PATHS")
    return 2 if paths is None else paths


def auto_channels(topology: Topology, host_ids: list[int], backend: str, hierarchical: bool,
                  paths: int) -> int:
    """Channels for ``num_channels=None`` (module docstring); same result on every rank.

    ``host_ids``: :func:`host_id` of every group rank; ``backend``: the group's backend name;
    ``paths``: :func:`net_paths` (agreed). Example: 2 nodes x 2 ranks on two machines, Gloo,
    hierarchical, 2 paths -> 4.
    """
    if not topology.is_multi_node or backend != "gloo":
        return 1
    per = topology.ranks_per_node
    machines = [set(host_ids[r] for r in topology.node_ranks(n)) for n in range(topology.num_nodes)]
    if any(a & b for i, a in enumerate(machines) for b in machines[i + 1:]):
        return 1  # two "nodes" on one machine: virtual nodes, loopback only
    per_channel = per if hierarchical else per * per
    flows = FLOWS_PER_PATH * paths
    return max(1, min(MAX_CHANNELS, -(-flows // per_channel)))
