"""The process group of one membership generation.

A new generation gets a new **default** process group, created on a fresh prefix of the job
store (``flexep/elastic/pg/<g>/``) after every member has arrived (a bounded rendezvous):
``destroy_process_group()`` on the old one, then ``init_process_group(store=...)`` with the new
ranks. The default group is replaced rather than a subgroup created because a replacement
process that joins was never part of the old world, and because Gloo poisons a group after a
failure (§8 #4 of the reliability matrix): ``new_group(survivors, use_local_synchronization=
True)`` works after a peer died, but the default group stays unusable for everything else that
relies on it. Measured on Gloo: the
destroy returns in under 0.05 s even with an exchange abandoned on a dead or frozen peer; the new
group forms in about 0.1 s.

The old groups are only destroyed, never used: their Python objects are kept alive (the
``retired`` list :func:`form` appends to, held for the life of the process) so that no
destructor runs while an abandoned exchange still waits inside the backend.

Consequence: under elastic EP the EP group is the process's default group (EP over the whole
world). Ranks are node-major; the node shape is kept when every node keeps the same number of
members, otherwise the group becomes one flat node (:func:`ranks_per_node`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from .membership import Membership, MembershipStore

__all__ = ["Generation", "form", "ranks_per_node", "retire_default_group"]


def ranks_per_node(nodes) -> int:
    """Members per node when every node has the same number (node-major order), else the whole
    group (one node, flat exchange). Example: ``[a, a, b, b] -> 2``; ``[a, a, b] -> 3``."""
    counts = [list(nodes).count(n) for n in dict.fromkeys(nodes)]
    return counts[0] if len(set(counts)) == 1 else len(nodes)


@dataclass
class Generation:
    """This process's view of one generation: its membership, its rank, its group.

    Attributes:
        membership: the agreed :class:`Membership`.
        member: this process's member id.
        group: the generation's process group (the default group).
        timeout: seconds any wait for a silent peer lasts (Buffers built for this generation
            should use it, see :meth:`buffer_kwargs`).
    """

    membership: Membership
    member: int
    group: dist.ProcessGroup
    timeout: float

    @property
    def generation(self) -> int:
        return self.membership.generation

    @property
    def rank(self) -> int:
        return self.membership.rank_of(self.member)

    @property
    def world(self) -> int:
        return self.membership.world

    @property
    def members(self) -> tuple:
        return self.membership.members

    @property
    def ranks_per_node(self) -> int:
        return ranks_per_node(self.membership.nodes)

    def buffer_kwargs(self) -> dict:
        """Keyword arguments for a :class:`flexep.Buffer` on :attr:`group`: the node shape, the
        generation stamped on every control row, and the timeout."""
        return dict(ranks_per_node=self.ranks_per_node, generation=self.generation, timeout=self.timeout)


def retire_default_group(retired: list) -> None:
    """Destroy the default group (if any), keeping its object alive in ``retired``."""
    if dist.is_initialized():
        retired.append(dist.group.WORLD)
        dist.destroy_process_group()


def form(membership: Membership, member: int, store, timeout: float, backend: str,
         retired: list) -> Generation:
    """Destroy the current default group and create ``membership``'s (collective over its members).

    Raises :class:`~flexep.errors.CommTimeoutError` naming the members that did not arrive within
    ``timeout``. The new group's own timeout (the backend's limit for one operation) is
    ``3 * timeout`` so that flexep's deadlines, which name the silent peer, fire first.
    """
    retire_default_group(retired)
    g = membership.generation
    MembershipStore(store).rendezvous(membership, member, timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"flexep/elastic/pg/{g}", store),
                            rank=membership.rank_of(member), world_size=membership.world,
                            timeout=timedelta(seconds=3 * timeout))
    return Generation(membership, member, dist.group.WORLD, timeout)
