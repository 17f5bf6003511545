"""Who is in the EP group: membership generations agreed through a store that outlives workers.

A **membership** is a numbered generation ``g`` and its member list (stable member ids in EP rank
order, each with a node label). Generation 0 is the launch's world. Every later generation is
decided exactly once, by whoever first writes its record with the store's atomic
``compare_set`` (the record key is absent until then); every other proposal for the same
generation reads the winner back. So the history is one chain ``0 -> 1 -> 2 ...`` whatever the
timing, and no leader is needed.

After a failure in generation ``g`` each survivor (:meth:`MembershipStore.agree_after_failure`):

1. posts ``g/alive/<id>``;
2. waits until every member it does not suspect (the ranks the failure named) has posted, or
   ``window`` seconds;
3. proposes ``g + 1`` = the members that posted, in their old order, and reads the winner.

A member missing from the winner (it was dead, frozen, or only slow and arrived after the
decision) is **excluded**: it gets :class:`~flexep.errors.StaleGenerationError` and must rejoin
as a new member, never talk to the old group again. A member that finished its work posts
``g/left/<id>`` (:meth:`leave`) so that nobody waits for it.

Joining: a new process takes a ticket (``join/tickets``, atomic ``add``) and waits for
``join/admitted/<ticket>``; the running members agree collectively on how many tickets to admit
and propose ``g + 1`` = members + joiners (:meth:`propose_admission`). A failure agreement and an
admission may race for the same generation; ``compare_set`` picks one, and whoever is not in it
carries on from there (joiners keep waiting).

Keys live under ``flexep/elastic/`` of the store given (see :func:`job_store` for which store).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch.distributed as dist

from ..errors import CommTimeoutError, StaleGenerationError

__all__ = ["Membership", "MembershipStore", "job_store", "node_major"]

PREFIX = "flexep/elastic/"
POLL = 0.02  # seconds between store polls while waiting for peers


@dataclass(frozen=True)
class Membership:
    """One generation of the EP group.

    Attributes:
        generation: g, 0 for the launch's world.
        members: member ids in EP rank order (node-major, see :func:`node_major`).
        nodes: node label of each member (same order).
        admitted: join tickets admitted so far (tickets ``1..admitted`` are decided).
        first_joiner_id: ids of joiners are ``first_joiner_id + ticket - 1``.
        reason: why this generation exists (for logs and error messages).
    """

    generation: int
    members: tuple
    nodes: tuple
    admitted: int = 0
    first_joiner_id: int = 0
    reason: str = "launch"

    @property
    def world(self) -> int:
        return len(self.members)

    def rank_of(self, member: int) -> int:
        return self.members.index(member)

    def to_json(self) -> str:
        return json.dumps(dict(generation=self.generation, members=list(self.members),
                               nodes=list(self.nodes), admitted=self.admitted,
                               first_joiner_id=self.first_joiner_id, reason=self.reason), sort_keys=True)

    @staticmethod
    def from_json(text) -> Membership:
        d = json.loads(text.decode() if isinstance(text, bytes) else text)
        return Membership(d["generation"], tuple(d["members"]), tuple(d["nodes"]), d["admitted"],
                          d["first_joiner_id"], d["reason"])


def node_major(members: Sequence[int], nodes: Sequence[str]) -> tuple[tuple, tuple]:
    """Reorder members so that each node's members are contiguous (nodes in order of first
    appearance, members in their given order inside a node), as hierarchical exchange needs.

    Example: members ``[0, 1, 3, 7]`` on nodes ``[a, a, b, a]`` -> ``[0, 1, 7, 3]``, ``[a, a, a, b]``.
    """
    order = {n: i for i, n in reversed(list(enumerate(nodes)))}
    pairs = sorted(zip(members, nodes), key=lambda p: order[p[1]])  # stable inside a node
    return tuple(m for m, _ in pairs), tuple(n for _, n in pairs)


def job_store(timeout: float = 300.0):
    """The store every process of the job can reach and that no worker hosts.

    ``FLEXEP_STORE`` (``host:port``, set by :func:`flexep.launch.run_local`, whose parent hosts
    it); else, under ``torchrun`` with the agent's store (``TORCHELASTIC_USE_AGENT_STORE``), that
    store at ``MASTER_ADDR:MASTER_PORT``; else the default group's store, which rank 0 usually
    hosts: losing rank 0 then loses the store, and recovery is impossible (documented limit).
    """
    addr = os.environ.get("FLEXEP_STORE")
    if not addr and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        addr = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if addr:
        host, port = addr.rsplit(":", 1)
        return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout))
    return dist.distributed_c10d._get_default_store()


class MembershipStore:
    """The membership protocol over ``store`` (see the module docstring). Thread-compatible:
    one instance per process."""

    def __init__(self, store) -> None:
        self.store = store

    # ---- records ---------------------------------------------------------------------------
    def _key(self, *parts) -> str:
        return PREFIX + "/".join(str(p) for p in parts)

    def record(self, generation: int) -> Optional[Membership]:
        key = self._key("gen", generation)
        return Membership.from_json(self.store.get(key)) if self.store.check([key]) else None

    def propose(self, candidate: Membership) -> Membership:
        """Write ``candidate`` unless its generation is decided already; return the decision."""
        won = self.store.compare_set(self._key("gen", candidate.generation), "", candidate.to_json())
        decided = Membership.from_json(won)
        self.store.set(self._key("latest", decided.generation), "1")
        return decided

    def latest(self, since: int) -> int:
        """The newest decided generation, scanning up from ``since`` (decisions are a chain)."""
        g = since
        while self.store.check([self._key("latest", g + 1)]):
            g += 1
        return g

    # ---- failures --------------------------------------------------------------------------
    def agree_after_failure(self, current: Membership, me: int, suspects: Sequence[int],
                            window: float) -> Membership:
        """The next generation after a failure in ``current`` (members only; see module doc).

        ``suspects``: member ids the failure named (not waited for). Raises
        :class:`StaleGenerationError` when this member is not in the decision.
        """
        g = current.generation
        nxt = self.record(g + 1)
        if nxt is None:
            self.store.set(self._key(g, "alive", me), "1")
            waited_for = [m for m in current.members if m not in set(suspects)]
            deadline = time.monotonic() + window
            while nxt is None:
                left = {m for m in current.members if self.store.check([self._key(g, "left", m)])}
                alive = [m for m in current.members
                         if m not in left and self.store.check([self._key(g, "alive", m)])]
                if set(waited_for) - left <= set(alive) or time.monotonic() >= deadline:
                    lost = [m for m in current.members if m not in alive and m not in left]
                    nodes = [current.nodes[current.rank_of(m)] for m in alive]
                    nxt = self.propose(Membership(g + 1, tuple(alive), tuple(nodes), current.admitted,
                                                  current.first_joiner_id, f"lost member(s) {lost}"))
                else:
                    time.sleep(POLL)
                    nxt = self.record(g + 1)
        newest = self.latest(nxt.generation)
        if me not in nxt.members or newest > nxt.generation and me not in self.record(newest).members:
            raise StaleGenerationError(
                f"member {me} was excluded: generation {nxt.generation} ({nxt.reason}) has members "
                f"{list(nxt.members)}; this process still held generation {g} (it was too slow or "
                "stopped while the others recovered). It must not use its old group again; rejoin "
                "as a new member with flexep.elastic.ElasticEP(join=True)",
                generation=g, current=newest)
        return nxt

    def leave(self, current: Membership, me: int) -> None:
        """Say that ``me`` has finished in ``current``: a later agreement does not wait for it."""
        self.store.set(self._key(current.generation, "left", me), "1")

    # ---- joining ---------------------------------------------------------------------------
    def take_ticket(self, node: str) -> int:
        """A new process's place in the join queue (1, 2, ...). Its member id follows from it."""
        ticket = self.store.add(self._key("join", "tickets"), 1)
        self.store.set(self._key("join", "ticket", ticket), node)
        return ticket

    def tickets(self) -> int:
        """How many tickets were taken so far (this process's view)."""
        return self.store.add(self._key("join", "tickets"), 0)

    def propose_admission(self, current: Membership, upto: int) -> Membership:
        """Propose ``current`` + the joiners of tickets ``current.admitted + 1 .. upto``.

        Every member calls this with the same ``upto`` (agreed collectively). The decision may
        instead be a failure agreement that won the race; joiners not in it keep waiting.
        """
        tickets = range(current.admitted + 1, upto + 1)
        joiners = [current.first_joiner_id + t - 1 for t in tickets]
        labels = [self.store.get(self._key("join", "ticket", t)).decode() for t in tickets]
        members, nodes = node_major(list(current.members) + joiners, list(current.nodes) + labels)
        decided = self.propose(Membership(current.generation + 1, members, nodes, upto,
                                          current.first_joiner_id, f"admitted member(s) {joiners}"))
        self.announce(decided)
        return decided

    def announce(self, decided: Membership) -> None:
        """Tell the joiners listed in ``decided`` which generation admitted them (idempotent;
        every member forming ``decided`` calls it, so one survivor suffices)."""
        for member in decided.members:
            ticket = member - decided.first_joiner_id + 1
            if 1 <= ticket <= decided.admitted:
                key = self._key("join", "admitted", ticket)
                if not self.store.check([key]):
                    self.store.set(key, str(decided.generation))

    def wait_admission(self, ticket: int, timeout: float,
                       cancel: Optional[Callable[[], bool]] = None) -> Optional[Membership]:
        """Block until ticket ``ticket`` is admitted; its generation's membership (None when
        ``cancel()`` became true first, e.g. the job has finished its work)."""
        key = self._key("join", "admitted", ticket)
        deadline = time.monotonic() + timeout
        while not self.store.check([key]):
            if cancel is not None and cancel():
                return None
            if time.monotonic() >= deadline:
                raise CommTimeoutError(f"join ticket {ticket} was not admitted within {timeout:g} s; the "
                                       "running members admit joiners when they call ElasticEP.admit()",
                                       op="join", phase="admission")
            time.sleep(POLL * 5)
        return self.record(int(self.store.get(key)))

    # ---- forming a generation --------------------------------------------------------------
    def rendezvous(self, membership: Membership, me: int, timeout: float) -> None:
        """Wait until every member of ``membership`` has arrived to form it (bounded)."""
        g = membership.generation
        self.store.set(self._key(g, "arrived", me), "1")
        deadline = time.monotonic() + timeout
        while True:
            missing = [m for m in membership.members if not self.store.check([self._key(g, "arrived", m)])]
            if not missing:
                return
            if time.monotonic() >= deadline:
                ranks = [membership.rank_of(m) for m in missing]
                raise CommTimeoutError(
                    f"member(s) {missing} did not arrive within {timeout:g} s to form generation {g}",
                    op="form", phase="rendezvous", ranks=ranks)
            time.sleep(POLL)
