"""``ElasticEP``: run expert-parallel steps that survive lost ranks and admit new ones.

State machine of one process (``docs/elastic.md`` has the diagram and measured costs)::

    JOINING --admitted--> FORMING --group + state moved--> RUNNING --step ok--> RUNNING
                             ^                                |
                             |                   PeerFailureError / CommTimeoutError
                             |                                v
                             +------- decided g+1 <------- AGREEING --not in g+1--> EXCLUDED
                                      (a failure while forming goes back to AGREEING)

* RUNNING: :meth:`ElasticEP.run` calls the step; a failure of a peer (typed flexep errors, or
  the backend's own connection/timeout errors from plain ``torch.distributed`` calls) is caught.
* AGREEING: :meth:`MembershipStore.agree_after_failure` decides generation g+1 among the members
  that answer (no leader, the store's ``compare_set`` picks one proposal).
* FORMING: a new default group on a fresh store prefix, a small control communicator stamped
  with the generation, then every ``on_change`` callback (e.g. :class:`ElasticMoE` moving expert
  weights); then the step is run again. A failure here goes back to AGREEING for g+1.
* EXCLUDED: :class:`~flexep.errors.StaleGenerationError`; the process may :meth:`rejoin`.

The step must be re-runnable: it reads the current rank and world from the ``ElasticEP`` (the
serving driver re-assigns the lost rank's requests from them) and has no side effect that a
second run would repeat differently.
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..comm.topology import resolve_ranks_per_node
from ..core.communicator import Communicator, Options
from ..errors import (
    BrokenCommunicatorError,
    CommTimeoutError,
    PeerFailureError,
    StaleGenerationError,
)
from .group import Generation, form, retire_default_group
from .membership import Membership, MembershipStore, job_store

__all__ = ["ElasticEP", "Change", "is_failure"]

T = TypeVar("T")
_TYPED = (CommTimeoutError, PeerFailureError, BrokenCommunicatorError)
# What Gloo says when a peer is gone or silent (torch raises plain RuntimeError for Gloo).
_BACKEND_TEXT = ("connection closed by peer", "connection reset by peer", "timed out", "pair closure",
                 "read error", "broken pipe", "connection refused", "socket closed")


def is_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means a peer died or went silent (recoverable by a new membership)."""
    if isinstance(exc, StaleGenerationError):
        return False
    if isinstance(exc, _TYPED) or isinstance(exc, dist.DistError):
        return True
    return type(exc) is RuntimeError and any(t in str(exc).lower() for t in _BACKEND_TEXT)


def _named_ranks(exc: BaseException) -> list[int]:
    """EP ranks a failure names (following ``__cause__``: a broken communicator quotes the
    original failure)."""
    while exc is not None:
        if getattr(exc, "ranks", ()):
            return list(exc.ranks)
        exc = exc.__cause__
    return []


@dataclass(frozen=True)
class Change:
    """One membership change as this process saw it (seconds, ``time.monotonic`` based).

    Attributes:
        kind: ``"failure"`` or ``"admission"``.
        generation: the generation formed; world: its size.
        lost, joined: member ids that left / arrived.
        error: the failure's type and message (empty for admissions).
        detected_at: ``time.time()`` when the failure reached :meth:`ElasticEP.run`.
        failed_after: seconds the failing attempt ran before the error.
        agree_s, form_s, restore_s: agreement, group formation, ``on_change`` callbacks.
    """

    kind: str
    generation: int
    world: int
    lost: tuple
    joined: tuple
    error: str
    detected_at: float
    failed_after: float
    agree_s: float
    form_s: float
    restore_s: float

    @property
    def recover_s(self) -> float:
        """From the error to the end of the callbacks: the time the step waited."""
        return self.agree_s + self.form_s + self.restore_s


class ElasticEP:
    """Membership, group and step execution for elastic expert parallelism.

    Args:
        timeout: seconds any wait for a silent peer lasts (store agreement, group formation);
            Buffers built for a generation should use it (:meth:`Generation.buffer_kwargs`).
        ranks_per_node: node shape of the launch's world (labels ``node0``, ``node1``, ...);
            default: resolved like a Buffer's (env, torchrun, host names).
        node: node label of a joining process (default ``FLEXEP_NODE`` or ``node0``).
        store: the job store (default :func:`~flexep.elastic.membership.job_store`).
        max_changes: membership changes one :meth:`run` may go through before giving up.

    A process of the launch's world (default group initialised) is a member of generation 0 at
    once (collective over that world). Any other process is a joiner: it becomes a member in
    :meth:`join`. Register ``on_change`` callbacks (e.g. :class:`ElasticMoE`) before :meth:`join`.
    """

    def __init__(self, *, timeout: float = 30.0, ranks_per_node: Optional[int] = None,
                 node: Optional[str] = None, store=None, max_changes: int = 8) -> None:
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.store = store if store is not None else job_store()
        self.members_store = MembershipStore(self.store)
        self.max_changes = max_changes
        self.history: list[Change] = []
        self._callbacks: list[Callable[[Generation], None]] = []
        self._control: Optional[Communicator] = None
        self._retired: list = []  # groups of earlier generations, never used, never destructed
        self.gen: Optional[Generation] = None
        self.node = node or os.environ.get("FLEXEP_NODE", "node0")
        if dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
            per = resolve_ranks_per_node(dist.group.WORLD, ranks_per_node)
            labels = tuple(f"node{r // per}" for r in range(world))
            first = Membership(0, tuple(range(world)), labels, 0, first_joiner_id=world)
            decided = self.members_store.propose(first)
            self.backend = dist.get_backend()
            self.member, self.node = rank, labels[rank]
            self.gen = Generation(decided, rank, dist.group.WORLD, self.timeout)
            self._control = self._control_communicator()
        else:
            self.backend, self.member = "gloo", -1

    # ---- the current generation ------------------------------------------------------------
    @property
    def generation(self) -> int:
        return self._current().generation

    @property
    def rank(self) -> int:
        return self._current().rank

    @property
    def world(self) -> int:
        return self._current().world

    @property
    def group(self) -> dist.ProcessGroup:
        return self._current().group

    @property
    def members(self) -> tuple:
        return self._current().members

    @property
    def is_member(self) -> bool:
        return self.gen is not None

    def _current(self) -> Generation:
        if self.gen is None:
            raise RuntimeError("this process is not a member yet: call ElasticEP.join() first")
        return self.gen

    def on_change(self, callback: Callable[[Generation], None]) -> None:
        """Call ``callback(generation)`` on every member after each new group is formed (in
        registration order, collective: every member registers the same callbacks)."""
        self._callbacks.append(callback)

    # ---- running steps ---------------------------------------------------------------------
    def run(self, step: Callable[[], T], *, lost: Optional[Callable[[], Sequence[int]]] = None,
            keep_result: bool = False) -> T:
        """``step()``, re-run on a new membership after each peer failure (see module doc).

        ``lost()``, asked after a step that returned, names EP ranks the step went on without
        (DeepEP's shrink mode masks a silent peer instead of raising); the membership then
        changes without them, and the step's result is kept (``keep_result``) or the step is
        re-run on the new group.
        """
        for _ in range(self.max_changes + 1):
            start = time.monotonic()
            try:
                out = step()
            except Exception as exc:  # noqa: BLE001 - only failures are handled, others re-raised
                if not is_failure(exc):
                    raise
                self.recover(exc, failed_after=time.monotonic() - start)
                continue
            gone = list(lost()) if lost is not None else []
            if not gone:
                return out
            self.recover(PeerFailureError(f"rank {self.rank} went on without masked rank(s) {gone} "
                                          "(shrink mode)", op="step", phase="mask", ranks=gone),
                         failed_after=time.monotonic() - start)
            if keep_result:
                return out
        raise RuntimeError(f"gave up after {self.max_changes} membership changes in one step")

    def recover(self, error: BaseException, failed_after: float = 0.0) -> None:
        """Agree on the survivors of the failure ``error``, form their group, run callbacks.

        Raises :class:`StaleGenerationError` when this process was excluded.
        """
        detected_at, start = time.time(), time.monotonic()
        cur = self._current().membership
        suspects = [cur.members[r] for r in _named_ranks(error) if 0 <= r < cur.world]
        nxt = self.members_store.agree_after_failure(cur, self.member, suspects, self.timeout)
        agreed = time.monotonic()
        form_s, restore_s = self._advance(nxt)
        lost = tuple(m for m in cur.members if m not in self.gen.members)
        self.history.append(Change("failure", self.generation, self.world, lost, (),
                                   f"{type(error).__name__}: {str(error)[:200]}", detected_at,
                                   failed_after, agreed - start, form_s, restore_s))

    def _advance(self, membership: Membership) -> tuple[float, float]:
        """Form ``membership`` (agreeing again after each failure while forming)."""
        for _ in range(self.max_changes):
            try:
                return self._form(membership)
            except Exception as exc:  # noqa: BLE001 - only failures are handled, others re-raised
                if not is_failure(exc):
                    raise
                suspects = [membership.members[r] for r in _named_ranks(exc) if 0 <= r < membership.world]
                membership = self.members_store.agree_after_failure(membership, self.member, suspects,
                                                                    self.timeout)
        raise RuntimeError(f"could not form a group after {self.max_changes} attempts")

    def _form(self, membership: Membership) -> tuple[float, float]:
        start = time.monotonic()
        self._control = None
        self.gen = form(membership, self.member, self.store, self.timeout, self.backend, self._retired)
        self.members_store.announce(membership)
        self._control = self._control_communicator()
        formed = time.monotonic()
        for callback in self._callbacks:
            callback(self.gen)
        return formed - start, time.monotonic() - formed

    def _control_communicator(self) -> Communicator:
        g = self.gen
        return Communicator(g.group, Options(ranks_per_node=g.world, hierarchical=False, timeout=self.timeout,
                                             generation=g.generation), label="ElasticEP")

    # ---- joining and leaving ---------------------------------------------------------------
    def join(self, timeout: float = 300.0, cancel: Optional[Callable[[], bool]] = None) -> bool:
        """Become a member: a joiner waits up to ``timeout`` s to be admitted (``CommTimeoutError``
        after that), or until ``cancel()`` is true (returns False: not a member); a member
        returns True at once."""
        if self.gen is not None:
            return True
        first = self.members_store.record(0)
        if first is None:
            raise RuntimeError("no elastic group is running in this job store (generation 0 is missing)")
        ticket = self.members_store.take_ticket(self.node)
        self.member = first.first_joiner_id + ticket - 1
        start = time.monotonic()
        membership = self.members_store.wait_admission(ticket, timeout, cancel)
        if membership is None:
            return False
        admitted = time.monotonic()
        form_s, restore_s = self._advance(membership)
        self.history.append(Change("admission", self.generation, self.world, (), (self.member,), "",
                                   time.time(), 0.0, admitted - start, form_s, restore_s))
        return True

    def rejoin(self, timeout: float = 300.0, cancel: Optional[Callable[[], bool]] = None) -> bool:
        """After :class:`StaleGenerationError`: drop the old group and join as a new member
        (arguments and result as :meth:`join`)."""
        retire_default_group(self._retired)
        self.gen, self._control = None, None
        return self.join(timeout, cancel)

    def admit(self, min_joiners: int = 0, timeout: float = 0.0) -> list[int]:
        """Admit the processes waiting to join (collective over the members).

        Waits up to ``timeout`` s until this rank sees ``min_joiners`` waiting, then the members
        agree on the number every one of them sees and form the next generation with them
        (``on_change`` callbacks move state onto them). Returns the admitted member ids.
        """
        cur = self._current().membership
        deadline = time.monotonic() + timeout
        seen = self.members_store.tickets()
        while seen - cur.admitted < min_joiners and time.monotonic() < deadline:
            time.sleep(0.05)
            seen = self.members_store.tickets()
        upto = min(v[0] for v in self.gather([seen]))
        if upto <= cur.admitted:
            return []
        start = time.monotonic()
        decided = self.members_store.propose_admission(cur, upto)
        if self.member not in decided.members:
            raise StaleGenerationError(f"member {self.member} is not in generation {decided.generation} "
                                       f"({decided.reason})", generation=cur.generation,
                                       current=decided.generation)
        agreed = time.monotonic()
        form_s, restore_s = self._advance(decided)
        joined = tuple(m for m in self.gen.members if m not in cur.members)
        self.history.append(Change("admission", self.generation, self.world, (), joined, "", time.time(),
                                   0.0, agreed - start, form_s, restore_s))
        return list(joined)

    def leave(self) -> None:
        """Say this member is done (a later failure agreement does not wait for it)."""
        if self.gen is not None:
            self.members_store.leave(self.gen.membership, self.member)

    # ---- small collectives over the current generation (deadline-bounded, typed errors) ------
    @property
    def control(self) -> Communicator:
        """The current generation's small control communicator (stamped with the generation)."""
        if self._control is None:
            raise RuntimeError("no group is formed")
        return self._control

    @property
    def transport(self):
        """The current generation's control transport (deadlines, failure detection)."""
        if self._control is None:
            raise RuntimeError("no group is formed")
        return self._control.transport

    def gather(self, values: Sequence[int]) -> list[list[int]]:
        """Every member's ``values`` (equal length), in rank order."""
        tp = self.transport
        tp.begin("elastic_gather")
        return tp.all_gather("gather", torch.tensor(list(values), dtype=torch.int64)).tolist()

    def gather_objects(self, obj) -> list:
        """Every member's picklable ``obj``, in rank order."""
        data = pickle.dumps(obj)
        width = max(v[0] for v in self.gather([len(data)]))
        row = torch.zeros(width, dtype=torch.uint8)
        row[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        tp = self.transport
        tp.begin("elastic_gather")
        table = tp.all_gather("objects", row)
        return [pickle.loads(bytes(r.tolist())) for r in table]

    def exchange(self, phase: str, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor],
                 send_counts: Sequence[int], recv_counts: Sequence[int]) -> None:
        """An uneven all-to-all of row tensors over the current generation (see
        :meth:`flexep.comm.transport.Transport.start` for the layout)."""
        tp = self.transport
        tp.begin(f"elastic_{phase}")
        tp.all_to_all(phase, sends, recvs, send_counts, recv_counts)
