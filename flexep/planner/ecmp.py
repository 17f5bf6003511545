"""ECMP: inter-node flows hashed onto the spine paths of a two-tier leaf-spine fabric.

Every NIC sits under a leaf switch; a leaf reaches every other leaf over ``U`` uplinks, one per
spine, each at ``uplink_gbps``. A flow leaving its leaf takes uplink ``u`` to spine ``u`` and
comes down the destination leaf's link ``u``. Flows between NICs under the same leaf never
touch the spine.

* **InfiniBand with adaptive routing**, and NICs that spray a flow's packets (EFA's SRD),
  spread each leaf's cross traffic evenly over its ``U`` links (the fluid limit, no collisions).
* **RoCE with ECMP** hashes each *flow* (a queue pair: its UDP source port) onto one path. A
  transfer that uses one queue pair per peer puts all of a peer's bytes on one random path, so
  a few links carry several flows while others idle; the phase ends when the most loaded link
  drains. With ``C`` channels per peer, each peer's bytes travel as ``C`` flows hashed
  independently, and the load evens out.
* **Balanced channels** (``balanced=True``): an implementation that steers each peer's rows
  over its ``C`` flows by their measured arrival (flexep over Gloo) spreads a pair's bytes
  evenly over the distinct paths its flows were hashed onto; only a pair whose flows all share
  one path stays there.

:func:`fabric_time_us` draws the hashing ``samples`` times and returns the mean over draws of
the most loaded link's drain time. Limit cases: with one path every cross flow shares it (the
time is the leaf's whole cross traffic over one link); with many more paths than flows no two
flows collide and the time is the largest single flow over one link.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..topology import Topology
from .hardware import Fabric

__all__ = ["FabricTime", "leaf_of", "fabric_time_us"]

_MAX_DRAW = 1 << 22  # hashed subflows drawn per batch of samples (bounds memory)
_MAX_WORK = 1 << 22  # subflows x samples per call: big fabrics get fewer (and need fewer) draws


@dataclass(frozen=True)
class FabricTime:
    """Spine-link drain time of one phase: ``mean_us`` over hashing draws, and the spread."""

    mean_us: float
    max_us: float
    cross_flows: int


def leaf_of(topo: Topology, fabric: Fabric) -> torch.Tensor:
    """``[W] int64`` leaf switch of every rank's NIC.

    Rail-optimized: local rank p of nodes ``0 .. hosts_per_leaf - 1`` share rail leaf p, the
    next ``hosts_per_leaf`` nodes the next group of rail leaves, and so on. Otherwise NICs fill
    leaves in rank order. Example (W = 16, P = 8, 2 hosts per leaf, rail-optimized): ranks 0
    and 8 are on leaf 0, ranks 1 and 9 on leaf 1.
    """
    rank = torch.arange(topo.world_size)
    if not fabric.rail_optimized:
        return rank // fabric.hosts_per_leaf
    p = topo.ranks_per_node
    group = (rank // p) // fabric.hosts_per_leaf
    return group * p + rank % p


def fabric_time_us(inter_flows: torch.Tensor, topo: Topology, fabric: Fabric, channels: int,
                   samples: int = 32, seed: int = 0, balanced: bool = False) -> FabricTime:
    """Drain time of the most loaded spine link for ``inter_flows: [W, W]`` bytes.

    ``channels`` flows per (sender, receiver) pair share its bytes equally (ECMP only), or,
    ``balanced``, evenly per distinct path they were hashed onto.
    """
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be an int >= 1, got {channels!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    leaf = leaf_of(topo, fabric)
    src, dst = (inter_flows > 0).nonzero(as_tuple=True)
    cross = leaf[src] != leaf[dst]
    src, dst = src[cross], dst[cross]
    nbytes = inter_flows[src, dst].to(torch.float64)
    if nbytes.numel() == 0:
        return FabricTime(0.0, 0.0, 0)
    num_leaves, links = int(leaf.max()) + 1, fabric.uplinks_per_leaf
    rate = fabric.uplink_gbs * 1e3  # bytes per us
    if fabric.routing in ("adaptive", "spray"):  # no per-flow hashing: the fluid limit
        up = torch.zeros(num_leaves, dtype=torch.float64).index_add_(0, leaf[src], nbytes)
        down = torch.zeros(num_leaves, dtype=torch.float64).index_add_(0, leaf[dst], nbytes)
        t = float(torch.maximum(up, down).max()) / links / rate
        return FabricTime(t, t, int(nbytes.numel()))
    part = (nbytes / channels).repeat(channels).float()  # C subflows per pair, hashed independently
    up_leaf, down_leaf = leaf[src].repeat(channels), leaf[dst].repeat(channels)
    gen = torch.Generator().manual_seed(seed)
    # Thousands of subflows make the maximum load concentrate, so few draws are needed then.
    samples = max(min(samples, 4), min(samples, _MAX_WORK // part.numel()))
    per_batch = max(1, _MAX_DRAW // part.numel())
    worst = []
    for lo in range(0, samples, per_batch):
        s = min(per_batch, samples - lo)
        path = torch.randint(links, (s, part.numel()), generator=gen)
        w = part.expand(s, -1).reshape(-1)
        if balanced and channels > 1:
            w = _balanced_bytes(path, nbytes, channels).reshape(-1)
        worst.append(torch.maximum(_max_link_load(path, up_leaf, w, num_leaves, links),
                                   _max_link_load(path, down_leaf, w, num_leaves, links)))
    worst_t = torch.cat(worst).double() / rate
    return FabricTime(float(worst_t.mean()), float(worst_t.max()), int(nbytes.numel()))


def _balanced_bytes(path: torch.Tensor, nbytes: torch.Tensor, channels: int) -> torch.Tensor:
    """``[S, C * F]`` bytes of each subflow when each pair spreads its bytes evenly over the
    distinct paths of its ``C`` subflows (subflow ``c * F + f`` is pair ``f``'s channel ``c``):
    a path's share goes to the first of the pair's subflows on it, the others carry none.

    Example (one pair of 12 bytes, 3 subflows on paths [0, 0, 1]): ``[6, 0, 6]``.
    """
    s, pairs = path.size(0), nbytes.numel()
    by_pair = path.view(s, channels, pairs)
    # A subflow is the first on its path among its pair's subflows: no earlier channel shares it.
    first = torch.ones_like(by_pair, dtype=torch.bool)
    for c in range(1, channels):
        first[:, c] = (by_pair[:, :c] != by_pair[:, c:c + 1]).all(1)
    distinct = first.sum(1, keepdim=True)  # [S, 1, F]
    share = nbytes.float().view(1, 1, pairs) / distinct
    return (share * first).reshape(s, channels * pairs)


def _max_link_load(path: torch.Tensor, leaf: torch.Tensor, nbytes: torch.Tensor, num_leaves: int,
                   links: int) -> torch.Tensor:
    """``[S]`` largest load over the (leaf, path) links of each sample.

    ``path: [S, F]`` path of every subflow, ``leaf: [F]`` its leaf, ``nbytes: [S * F]``. Links
    are indexed densely when there are few; with very many paths only the used ones are kept.
    """
    s = path.size(0)
    per_sample = num_leaves * links
    key = (torch.arange(s)[:, None] * per_sample + leaf * links + path).reshape(-1)
    if per_sample <= 1 << 16:
        load = torch.zeros(s * per_sample).index_add_(0, key, nbytes)
        return load.view(s, per_sample).max(1).values
    used, slot = torch.unique(key, return_inverse=True)
    load = torch.zeros(used.numel()).index_add_(0, slot, nbytes)
    best = torch.zeros(s)
    return best.scatter_reduce_(0, used // per_sample, load, reduce="amax")
