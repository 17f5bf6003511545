"""Uneven all-to-all over a process group, with deadlines, channels and byte accounting.

Every exchange flexep makes goes through :class:`Transport`. It owns three concerns the
algorithms must not care about:

* **Deadlines.** Each public call gets one deadline (``Buffer(timeout=...)``); every wait uses
  the time left. A failed or late wait is turned into :class:`~flexep.errors.CommTimeoutError` or
  :class:`~flexep.errors.PeerFailureError` naming the peers not heard from, found by a short roll
  call through the group's rendezvous store. The group is then marked broken: later calls raise
  :class:`~flexep.errors.BrokenCommunicatorError` at once instead of waiting on a poisoned group.
* **Channels.** With ``num_channels = C > 1`` each peer's block of rows is cut into C contiguous
  row ranges that travel on C process groups concurrently (point-to-point, zero copy). With one
  channel a single ``all_to_all_single`` is used, the fastest primitive on Gloo and NCCL.
* **Verification.** With ``verify=True`` every payload exchange is followed by a checksum
  round (:mod:`flexep.verify`) that raises on every rank if any pair lost or altered rows.
* **Accounting.** Bytes sent to every peer are recorded and classified by link
  (local / intra-node / inter-node) into a :class:`TrafficStats`.

Gloo has no float8 type, so tensors are moved as same-size integer views (:func:`wire_view`).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ._dtypes import wire_view
from .errors import BrokenCommunicatorError, CommTimeoutError, FlexepRuntimeError, PeerFailureError
from .topology import Topology
from .verify import block_checksums, check_exchange
from .workspace import Workspace

__all__ = ["Transport", "TrafficStats", "wire_view", "LINK_CLASSES"]

LINK_CLASSES = ("local", "intra", "inter")

@dataclass
class TrafficStats:
    """Bytes moved by one call, per link class, next to the minimum the routing allows.

    ``sent`` counts every byte this rank handed to the transport for a peer (payload and the
    small control messages); ``payload`` counts token data only. ``minimum`` is filled by the
    algorithm from the routing alone (each token once per destination rank, or once per
    destination node across the network in hierarchical mode).
    """

    sent: dict = field(default_factory=lambda: dict.fromkeys(LINK_CLASSES, 0))
    payload: dict = field(default_factory=lambda: dict.fromkeys(LINK_CLASSES, 0))
    minimum: dict = field(default_factory=lambda: dict.fromkeys(LINK_CLASSES, 0))
    messages: int = 0

    def ratio(self, link: str = "all") -> float:
        """Payload bytes over the minimum for ``link`` (``"all"`` sums intra and inter)."""
        keys = ("intra", "inter") if link == "all" else (link,)
        got, low = sum(self.payload[k] for k in keys), sum(self.minimum[k] for k in keys)
        return got / low if low else (1.0 if got == 0 else float("inf"))


class Transport:
    """Exchanges over one EP group. Not thread-safe; one per ``Buffer``.

    Args:
        group: the EP process group.
        topo: its node shape (used to classify links for accounting).
        timeout: seconds each public call may spend waiting in total.
        channel_groups: extra groups for channels 1..C-1 (channel 0 is ``group``), per role.
        fault_hook: test-only callable invoked with a phase name at each phase boundary.
    """

    def __init__(self, group: dist.ProcessGroup, topo: Topology, timeout: float,
                 channel_groups: Optional[dict] = None,
                 fault_hook: Optional[Callable[[str], None]] = None, uid: int = 0,
                 verify: bool = False) -> None:
        self.group = group
        self.rank = group.rank()
        self.world = group.size()
        self.topo = topo
        self.timeout = float(timeout)
        self.channel_groups = channel_groups or {}
        self.fault_hook = fault_hook
        self.uid = uid
        self.verify = verify
        self.broken: Optional[BaseException] = None
        self.seq = 0
        self.op = ""
        self._deadline = float("inf")
        self.stats = TrafficStats()
        self.workspace = Workspace()  # scratch reused across calls (see flexep.workspace)
        self._global = dist.get_process_group_ranks(group)
        # Gloo survives a timed-out wait (it can be waited on again); other backends may not.
        self._sliced = dist.get_backend(group) == "gloo"

    # ---- call lifecycle -------------------------------------------------------------------
    def begin(self, op: str) -> int:
        """Start a public call: check the group is healthy, set its deadline, reset stats."""
        if self.broken is not None:
            raise BrokenCommunicatorError(
                f"the EP group is unusable after an earlier failure ({self.broken}); "
                "destroy this Buffer, rebuild the process group and create a new Buffer",
                op=op, seq=self.seq + 1) from self.broken
        self.seq += 1
        self.op = op
        self._deadline = time.monotonic() + self.timeout
        self.stats = TrafficStats()
        return self.seq

    def fault_point(self, phase: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(phase)

    def remaining(self) -> float:
        return self._deadline - time.monotonic()

    # ---- collectives ----------------------------------------------------------------------
    def all_gather(self, phase: str, t: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                   members: Optional[Sequence[int]] = None,
                   meanwhile: Optional[Callable[[], None]] = None) -> torch.Tensor:
        """All-gather a small 1-D tensor: ``[F] -> [G, F]`` (G = size of ``group``).

        ``meanwhile`` runs after this rank's part is posted and before the wait: local work
        that hides the round's latency (which on a busy host is mostly waiting for peers).
        """
        group = group or self.group
        members = members or list(range(self.world))
        # An all-to-all of G copies rather than an all-gather: every pair talks directly, where
        # Gloo's ring all-gather takes G - 1 dependent steps (measured on 4 ranks sharing 2
        # cores: 2.7 ms vs 3.1 ms; 3 ranks: 0.9 ms vs 2.0 ms). The bytes received are the same.
        out = t.new_empty(len(members) * t.numel())
        work = dist.all_to_all_single(out, t.contiguous().repeat(len(members)), group=group,
                                      async_op=True)
        me = members.index(self.rank)
        for i, peer in enumerate(members):
            if i != me:
                self._account(peer, t.numel() * t.element_size(), payload=False)
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            self._wait([work], phase, members)
        return out.view(len(members), t.numel())

    def all_to_all(self, phase: str, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor],
                   send_counts: Sequence[int], recv_counts: Sequence[int], *,
                   group: Optional[dist.ProcessGroup] = None, role: str = "ep",
                   members: Optional[Sequence[int]] = None, payload: bool = True) -> None:
        """Uneven all-to-all of several row-aligned tensor pairs sharing one split.

        ``sends[i]: [sum(send_counts), ...]`` rows grouped by destination (group rank order);
        ``recvs[i]: [sum(recv_counts), ...]`` is filled grouped by source. ``members`` maps the
        ranks of ``group`` to EP ranks (default: ``group`` is the EP group).
        """
        group = group or self.group
        members = list(members) if members is not None else list(range(self.world))
        me = members.index(self.rank)
        send_counts, recv_counts = list(send_counts), list(recv_counts)
        channels = [group] + self.channel_groups.get(role, [])
        works = []
        for s, r in zip(sends, recvs):
            s, r = wire_view(s), wire_view(r)
            row_bytes = math.prod(s.shape[1:]) * s.element_size()
            for i, peer in enumerate(members):
                self._account(peer, send_counts[i] * row_bytes, payload=payload)
            if len(channels) == 1:
                works.append(dist.all_to_all_single(r, s, recv_counts, send_counts, group=group,
                                                    async_op=True))
            else:
                works += self._p2p_channels(s, r, send_counts, recv_counts, channels, me)
        self._wait(works, phase, members)
        if self.verify and payload:
            check_exchange(self, phase, block_checksums(sends, send_counts),
                           block_checksums(recvs, recv_counts), members, group)

    def _p2p_channels(self, s, r, send_counts, recv_counts, channels, me):
        """Point-to-point on C groups; channel c carries the c-th contiguous row range per peer."""
        works = []
        s_off = [0] + torch.tensor(send_counts).cumsum(0).tolist()
        r_off = [0] + torch.tensor(recv_counts).cumsum(0).tolist()
        num = len(channels)
        for i in range(len(send_counts)):
            if i == me:
                r[r_off[i]:r_off[i + 1]].copy_(s[s_off[i]:s_off[i + 1]])
                continue
            for c, g in enumerate(channels):
                lo, hi = _chunk(recv_counts[i], num, c)
                if hi > lo:
                    works.append(_PointToPoint(dist.irecv(r[r_off[i] + lo:r_off[i] + hi], group=g,
                                                          group_src=i)))
                lo, hi = _chunk(send_counts[i], num, c)
                if hi > lo:
                    works.append(_PointToPoint(dist.isend(s[s_off[i] + lo:s_off[i] + hi], group=g,
                                                          group_dst=i)))
        return works

    # ---- failure handling -----------------------------------------------------------------
    def _account(self, peer: int, nbytes: int, payload: bool) -> None:
        link = self.topo.link_class(self.rank, peer)
        self.stats.sent[link] += nbytes
        if payload:
            self.stats.payload[link] += nbytes
        if link != "local" and nbytes:
            self.stats.messages += 1

    def _wait(self, works, phase: str, members: Sequence[int]) -> None:
        """Wait for ``works`` (an exchange among ``members``) within the call's deadline.

        Any failure becomes a typed flexep error naming the silent ranks of the whole EP group
        (see :meth:`_failure`) and poisons the transport.
        """
        watcher: Optional[_FailureWatcher] = None
        try:
            for w in works:
                watcher = self._wait_one(w, watcher)
        except Exception as exc:  # noqa: BLE001 - every backend error is re-raised, typed
            raise self._failure(phase, exc) from exc
        finally:
            if watcher is not None:
                watcher.stop()
        self.fault_point(f"after_{phase}")

    def _wait_one(self, work, watcher: Optional[_FailureWatcher]) -> Optional[_FailureWatcher]:
        """Wait for ``work`` until the deadline; on Gloo, give up early if a peer reported a failure.

        An exchange need not connect a rank to the victim (a node or rail subgroup of the
        hierarchical exchange, a ring collective), so a rank whose partners are alive would only
        notice a dead peer at its own deadline, long after the ranks next to the victim. On Gloo
        the wait is therefore cut into slices; once a wait has lasted one slice, a watcher thread
        polls the store for a failure another rank posted (the store is never touched on this
        thread: a frozen store host must not block it). Point-to-point operations (channels) get
        one wait with the time left: when a timed Gloo send/recv wait expires, Gloo tears down
        every connection of the group, so a slice would turn a slow transfer into a failure.
        Other backends get one wait with the time left (a timed-out NCCL wait may abort).
        """
        p2p = isinstance(work, _PointToPoint)
        work = work.work if p2p else work
        while True:
            left = self.remaining()
            if left <= 0:
                raise TimeoutError("deadline passed before the wait started")
            sliced = self._sliced and not p2p and left > _SLICE
            try:
                work.wait(timeout=timedelta(seconds=_SLICE if sliced else left))
                return watcher
            except RuntimeError as exc:
                if not sliced or "timed out" not in str(exc).lower():
                    raise
            if watcher is None:
                watcher = _FailureWatcher(self._failure_key())
            if watcher.report is not None:
                raise RuntimeError(f"stopped waiting: {watcher.report}")

    def _failure_key(self) -> str:
        return f"flexep/{self.uid}/failed"

    def _failure(self, phase: str, exc: BaseException) -> FlexepRuntimeError:
        """Classify a failed wait, name the peers not heard from, and poison the transport."""
        text = str(exc)
        timed_out = isinstance(exc, TimeoutError) or "timed out" in text.lower() or "timeout" in text.lower()
        # The roll call spans the whole EP group, not just ``members``: a hierarchical step runs
        # on a node or rail subgroup whose members may all be alive while the victim is elsewhere.
        report = f"rank {self.rank} in {self.op}/{phase}: {text.strip()[:300]}"
        missing = self._roll_call(range(self.world), report)
        who = f"rank(s) {missing}" if missing else "no rank identified (all answered the roll call)"
        kind = CommTimeoutError if timed_out else PeerFailureError
        what = f"timed out after {self.timeout:g} s" if timed_out else "lost a peer"
        err = kind(f"rank {self.rank} {what}; not heard from: {who}; backend said: {text.strip()[:300]}",
                   op=self.op, phase=phase, seq=self.seq, ranks=missing)
        self.broken = err
        return err

    def _roll_call(self, members: Sequence[int], report: str) -> list[int]:
        """EP ranks among ``members`` that do not answer through the rendezvous store.

        Survivors of a failed exchange post ``report`` (so peers still waiting stop early, see
        :meth:`_wait_one`), then each posts a key and waits a short window for the others; a
        dead or frozen peer never posts. The key is per Buffer and rank, not per call: a
        transport holds at most one roll call (it is broken afterwards), and survivors that
        fail in different calls (one finished the exchange, the other did not) still find
        each other. Store calls can block forever when the store's host is frozen (SIGSTOP),
        so they run in a helper thread joined with a deadline; a store that is gone or does
        not answer in time means its host (global rank 0) is the one not heard from.
        """
        store = _default_store()
        if store is None:  # no store means no evidence, not a new failure
            return []
        window = min(5.0, max(1.0, self.timeout / 4))
        result: dict = {}
        helper = threading.Thread(target=self._answer_roll_call, name="flexep-roll-call", daemon=True,
                                  args=(store, [p for p in members if p != self.rank], window, report,
                                        result))
        helper.start()
        helper.join(window + 1.0)
        if "missing" in result:
            return list(result["missing"])
        host = self._global.index(0) if 0 in self._global else None
        return [host] if host is not None and host != self.rank else []

    def _answer_roll_call(self, store, peers: list[int], window: float, report: str, result: dict) -> None:
        """Post the failure and this rank's key, then poll the peers' keys for ``window`` seconds."""
        prefix = f"flexep/{self.uid}/rollcall/"
        try:
            store.set(self._failure_key(), report)
            store.set(prefix + str(self.rank), str(self.seq))
            end = time.monotonic() + window
            missing = list(peers)
            while True:
                missing = [p for p in missing if not store.check([prefix + str(p)])]
                # Kept after every poll: if the store's host exits (it may be a survivor that
                # finished its own roll call first), what was learned so far still stands.
                result["missing"] = missing
                if not missing or time.monotonic() >= end:
                    return
                time.sleep(0.05)
        except Exception as exc:  # noqa: BLE001 - the store died with its host process
            result["store_error"] = exc


class _PointToPoint:
    """Marks an isend/irecv work, which :meth:`Transport._wait_one` must not wait on in slices."""

    __slots__ = ("work",)

    def __init__(self, work) -> None:
        self.work = work


_SLICE = 0.25  # seconds a Gloo wait runs before the failure watcher starts / is consulted


def _default_store():
    """The default group's rendezvous store, or None when there is none."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - e.g. a group built without init_process_group
        return None


class _FailureWatcher:
    """Daemon thread polling the store for a failure posted by another rank.

    ``report`` becomes the posted text once seen. The thread may stay blocked inside a store
    call if the store's host is frozen; it is a daemon, and the caller only ever reads
    ``report`` (the roll call that follows has its own deadline).
    """

    def __init__(self, key: str) -> None:
        self.key, self.report = key, None
        self._stop = threading.Event()
        self._store = _default_store()
        if self._store is not None:
            threading.Thread(target=self._poll, name="flexep-failure-watcher", daemon=True).start()

    def _poll(self) -> None:
        try:
            while not self._stop.is_set():
                if self._store.check([self.key]):
                    self.report = self._store.get(self.key).decode(errors="replace")
                    return
                self._stop.wait(_SLICE)
        except Exception:  # noqa: BLE001 - a dead store: the waits still end at the deadline
            return

    def stop(self) -> None:
        self._stop.set()


def _chunk(n: int, parts: int, i: int) -> tuple[int, int]:
    """Row range of part ``i`` when ``n`` rows are cut into ``parts`` contiguous ranges.

    Example: n = 5, parts = 2 -> part 0 is ``(0, 3)``, part 1 is ``(3, 5)``.
    """
    size = (n + parts - 1) // parts
    return min(n, i * size), min(n, (i + 1) * size)
