"""The inter-node floor of a multi-node run: the time the routing alone needs on the network.

Over several nodes, every token must cross the network once per remote node that holds one of
its experts, and its expert output must come back once: the minimal rows are one per
(token, remote node), in each direction. A node's links carry ``paths x gbit`` each way (full
duplex, shared by all its peers), so an exchange cannot end before the busiest node has pushed
its outgoing rows and taken in its incoming ones::

    dispatch floor = max over nodes n of max(rows out of n, rows into n) x dispatch row bytes / rate
    combine floor  = the same rows, reversed, x combine row bytes / rate

The rows come from ``is_token_in_rank`` of every rank (the routing), never from what an
algorithm sent, so an algorithm that sends more than it must shows as a ratio above 1. Row
bytes count the token data only (hidden x element size, plus FP8 scales): the metadata that
travels with a row (indices, weights) is under 1% of it at DeepSeek-V3's shape.

The link rate comes from ``--link-gbit``/``--paths``, else ``NETBED_GBIT``/``NETBED_PATHS``,
else the state file of the netbed testbed the process runs in (``netbed run`` and
``netbed torchrun`` set ``NETBED_NAME``; the file is ``$NETBED_STATE_DIR/<name>.state``,
``/run/netbed`` by default).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from ..algorithms.hierarchical import node_membership

__all__ = ["LinkRate", "link_rate", "node_rows", "NodeFloor", "inter_node_floor"]


@dataclass(frozen=True)
class LinkRate:
    """One node's network: ``paths`` links of ``gbit`` Gbit/s each way; ``source`` says where
    the figures came from (a flag, the environment, a netbed state file)."""

    gbit: float
    paths: int
    source: str

    @property
    def bytes_per_s(self) -> float:
        """A node's bandwidth in each direction, all paths together, in bytes per second."""
        return self.gbit * 1e9 / 8 * self.paths


def _netbed_state(env: Mapping[str, str]) -> dict:
    name = env.get("NETBED_NAME")
    if not name:
        return {}
    path = os.path.join(env.get("NETBED_STATE_DIR", "/run/netbed"), f"{name}.state")
    try:
        with open(path) as f:
            pairs = [line.strip().split("=", 1) for line in f if "=" in line]
    except OSError:
        return {}
    state = {k: v for k, v in pairs if k in ("gbit", "paths")}
    return dict(state, source=f"netbed testbed '{name}'") if "gbit" in state else {}


def link_rate(gbit: Optional[float] = None, paths: Optional[int] = None,
              env: Optional[Mapping[str, str]] = None) -> Optional[LinkRate]:
    """The link rate from flags, else ``NETBED_GBIT``/``NETBED_PATHS``, else the netbed state
    file named by ``NETBED_NAME``; ``None`` when no rate is known. ``paths`` defaults to 1."""
    env = os.environ if env is None else env
    if gbit is not None:
        default_paths, source = env.get("NETBED_PATHS", 1), "flags"
    elif env.get("NETBED_GBIT"):
        gbit, source = float(env["NETBED_GBIT"]), "NETBED_GBIT/NETBED_PATHS"
        default_paths = env.get("NETBED_PATHS", 1)
    else:
        state = _netbed_state(env)
        if not state:
            return None
        gbit, default_paths, source = float(state["gbit"]), state.get("paths", 1), state["source"]
    return _checked(gbit, paths if paths is not None else int(default_paths), source)


def _checked(gbit: float, paths: int, source: str) -> LinkRate:
    if not gbit > 0 or paths < 1:
        raise ValueError(f"link rate: expected gbit > 0 and paths >= 1, got gbit={gbit}, paths={paths} "
                         f"(from {source})")
    return LinkRate(float(gbit), int(paths), source)


def node_rows(is_token_in_rank: torch.Tensor, ranks_per_node: int) -> list:
    """Rows this rank needs to send to each node: ``[N]`` ints, entry n = tokens with at least
    one destination rank on node n (one row per (token, node)).

    ``is_token_in_rank`` is ``[T, W]`` bool, ``W`` a multiple of ``ranks_per_node`` (node-major
    ranks). One host read (the benchmark runs it outside the timed phases).
    """
    w = is_token_in_rank.size(1)
    if w % ranks_per_node:
        raise ValueError(f"is_token_in_rank: width {w} is not a multiple of ranks_per_node {ranks_per_node}")
    return node_membership(is_token_in_rank, ranks_per_node).sum(0).tolist()


@dataclass(frozen=True)
class NodeFloor:
    """The floor of one routing: rows and bytes of the busiest node, seconds given a rate.

    ``rows_out[n]`` / ``rows_in[n]``: (token, node) rows node n sends to / receives from other
    nodes in dispatch (combine reverses them). ``rows`` is the busiest node's max of the two.
    """

    rows_out: tuple
    rows_in: tuple
    rows: int
    busiest_node: int
    dispatch_bytes: int
    combine_bytes: int
    dispatch_s: Optional[float]
    combine_s: Optional[float]

    @property
    def total_s(self) -> Optional[float]:
        return None if self.dispatch_s is None else self.dispatch_s + self.combine_s


def inter_node_floor(rows: Sequence[Sequence[int]], ranks_per_node: int, dispatch_row_bytes: int,
                     combine_row_bytes: int, rate: Optional[LinkRate] = None) -> NodeFloor:
    """The inter-node floor from every rank's :func:`node_rows` (``rows[r][n]``, ranks node-major).

    Example: 2 nodes x 1 rank, rank 0 needs node 1 for 3 tokens, rank 1 needs node 0 for 5:
    node 0 sends 3 rows and receives 5, node 1 the reverse, so the busiest moves 5 rows; with
    1000-byte dispatch rows, 500-byte combine rows and 1 path of 0.0008 Gbit/s (100 kB/s) the
    floor is 5000 B / 100 kB/s + 2500 B / 100 kB/s = 75 ms.
    """
    world = len(rows)
    if world % ranks_per_node:
        raise ValueError(f"rows: {world} ranks is not a multiple of ranks_per_node {ranks_per_node}")
    nodes = world // ranks_per_node
    out, into = [0] * nodes, [0] * nodes
    for r, per_node in enumerate(rows):
        if len(per_node) != nodes:
            raise ValueError(f"rows[{r}]: expected {nodes} node counts, got {len(per_node)}")
        src = r // ranks_per_node
        for n, count in enumerate(per_node):
            if n != src:
                out[src] += int(count)
                into[n] += int(count)
    busiest = max(range(nodes), key=lambda n: max(out[n], into[n]))
    most = max(out[busiest], into[busiest])
    d_bytes, c_bytes = most * dispatch_row_bytes, most * combine_row_bytes
    d_s = c_s = None
    if rate is not None:
        d_s, c_s = d_bytes / rate.bytes_per_s, c_bytes / rate.bytes_per_s
    return NodeFloor(tuple(out), tuple(into), most, busiest, d_bytes, c_bytes, d_s, c_s)
