"""Uneven all-to-all over a process group: one start/wait primitive with deadlines and channels.

Every byte flexep moves goes through :meth:`Transport.start` (post an exchange) and
:meth:`Transport.wait` (wait for it); :meth:`Transport.all_to_all` and
:meth:`Transport.all_gather` are the two in one. Around that primitive the transport owns:

* **Deadlines.** Each public call gets one deadline (``timeout`` seconds); every wait uses the
  time left. A failed or late wait becomes :class:`~flexep.errors.CommTimeoutError` or
  :class:`~flexep.errors.PeerFailureError` naming the ranks not heard from
  (:mod:`flexep.comm.failure`), and the transport is marked broken: later calls raise
  :class:`~flexep.errors.BrokenCommunicatorError` at once instead of waiting on a poisoned group.
* **Channels.** With ``num_channels = C > 1`` each peer's block of rows is cut into C contiguous
  row ranges that travel on C process groups concurrently (point-to-point, zero copy). With one
  channel a single ``all_to_all_single`` is used, the fastest primitive on Gloo and NCCL.
* **Channel balance.** An exchange may cut each peer's rows by per-channel weights instead of
  evenly (``lane_weights``). On Gloo the receiver then times each channel's arrival and steers
  its weights for that peer towards equal finishing times (:meth:`Transport.recv_weights`):
  a connection keeps its network path (ECMP hashes it once), so a path that a hash crowded
  stays crowded, and its channels get fewer rows. The caller publishes the weights so that
  both ends cut alike.
* **Verification.** With ``verify=True`` every payload exchange is followed by a checksum round
  (:mod:`flexep.comm.verify`) that raises on every rank if any pair lost or altered rows.
* **Accounting.** Bytes handed to the backend are recorded per link class in the call's
  :class:`~flexep.comm.accounting.TrafficStats`.

Gloo has no float8 type, so tensors are moved as same-size integer views (:func:`wire_view`).
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .._dtypes import wire_view
from ..errors import BrokenCommunicatorError, CommTimeoutError, FlexepRuntimeError, PeerFailureError
from .accounting import TrafficStats
from .failure import SLICE, FailureDetector, FailureWatcher
from .topology import Topology
from .workspace import Workspace

__all__ = ["Transport", "Exchange", "wire_view"]


@dataclass
class Exchange:
    """An exchange posted by :meth:`Transport.start` and not waited yet."""

    phase: str
    works: list
    members: list
    group: dist.ProcessGroup
    sends: Sequence[torch.Tensor]
    recvs: Sequence[torch.Tensor]
    send_counts: list
    recv_counts: list
    check: bool
    sliced: bool
    done: bool = False
    role: str = "ep"
    # (work, EP peer, channel, bytes): receives whose arrival times steer the channel weights
    timed: list = field(default_factory=list)
    posted: float = 0.0


class Transport:
    """Exchanges over one EP group. Not thread-safe; one per communicator.

    Args:
        group: the EP process group.
        topo: its node shape (classifies links for accounting).
        timeout: seconds each public call may spend waiting in total.
        channels: extra groups for channels 1..C-1 (channel 0 is the hop's own group), per
            role: ``"ep"`` (the EP group), ``"intra"`` (node groups), ``"rail"`` (rail groups).
        detector: roll calls through the store (names silent ranks on failure).
        verify: checksum every payload exchange.
        fault_hook: test-only callable invoked with a phase name at each phase boundary.
    """

    def __init__(self, group: dist.ProcessGroup, topo: Topology, timeout: float, *,
                 channels: Optional[dict] = None, detector: Optional[FailureDetector] = None,
                 verify: bool = False, fault_hook: Optional[Callable[[str], None]] = None) -> None:
        self.group = group
        self.rank = group.rank()
        self.world = group.size()
        self.topo = topo
        self.timeout = float(timeout)
        self.channels = channels or {}
        self.detector = detector or FailureDetector(0, self.rank, self.world, None)
        self.verify = verify
        self.fault_hook = fault_hook
        self.broken: Optional[BaseException] = None
        self.seq = 0
        self.op = ""
        self._deadline = float("inf")
        self.stats = TrafficStats()
        self.workspace = Workspace()  # scratch reused across calls (see flexep.comm.workspace)
        self._sliced: dict = {}  # group -> whether its waits can be sliced (its backend is Gloo)
        self._weights: dict = {}  # (role, EP peer) -> channel weights for rows from that peer

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

    def lanes(self, role: str) -> int:
        """Channels of ``role``'s exchanges."""
        return 1 + len(self.channels.get(role, []))

    def recv_weights(self, role: str, peers: Sequence[int]) -> list[int]:
        """``[len(peers) * C]`` integer weights (each peer's sum is ``WEIGHT_SUM``) for cutting
        the rows each of ``peers`` sends this rank over ``role``'s channels: equal at first, then
        as steered by the measured arrivals. Publish them; senders cut by the published values.
        """
        lanes = self.lanes(role)
        out: list[int] = []
        for peer in peers:
            w = self._weights.get((role, peer))
            out += _quantize(w) if w is not None else _even(lanes)
        return out

    def _steer(self, role: str, arrivals: dict) -> None:
        """Update each peer's channel weights from one exchange's ``arrivals``: peer ->
        ``[(channel, bytes, seconds)]``; peers with a channel missing or too small are skipped."""
        lanes = self.lanes(role)
        for peer, got in arrivals.items():
            if len(got) != lanes or min(b for _, b, _ in got) < STEER_MIN_BYTES:
                continue
            old = self._weights.get((role, peer)) or [1.0] * lanes
            self._weights[(role, peer)] = steer(old, [t for _, _, t in sorted(got)])

    # ---- the primitive --------------------------------------------------------------------
    def start(self, phase: str, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor],
              send_counts: Sequence[int], recv_counts: Sequence[int], *,
              group: Optional[dist.ProcessGroup] = None, role: str = "ep",
              members: Optional[Sequence[int]] = None, payload: bool = True,
              lane_weights: Optional[tuple] = None) -> Exchange:
        """Post an uneven all-to-all of row-aligned tensor pairs sharing one split.

        ``sends[i]: [sum(send_counts), ...]`` rows grouped by destination (group rank order);
        ``recvs[i]: [sum(recv_counts), ...]`` is filled grouped by source once waited.
        ``members`` maps the ranks of ``group`` to EP ranks (default: ``group`` is the EP
        group). ``payload=False`` marks control data (accounted, never verified).
        ``lane_weights``: ``(send, recv)``, per group rank the channel weights to cut the rows
        to / from it by (the receiver's published :meth:`recv_weights`); default even.
        """
        group = group or self.group
        members = list(members) if members is not None else list(range(self.world))
        me = members.index(self.rank)
        send_counts, recv_counts = [int(c) for c in send_counts], [int(c) for c in recv_counts]
        lanes = [group] + self.channels.get(role, [])
        works: list = []
        timed: list = []
        steer = lane_weights is not None and len(lanes) > 1
        for s, r in zip(sends, recvs):
            s, r = wire_view(s), wire_view(r)
            row_bytes = math.prod(s.shape[1:]) * s.element_size()
            for i, peer in enumerate(members):
                self.stats.record(self.topo.link_class(self.rank, peer), send_counts[i] * row_bytes,
                                  payload)
            if len(lanes) == 1:
                works.append(dist.all_to_all_single(r, s, recv_counts, send_counts, group=group,
                                                    async_op=True))
            else:
                works += _channels(s, r, send_counts, recv_counts, lanes, me, lane_weights,
                                   timed if steer else None, members, row_bytes)
        # Gloo survives a timed-out wait (it can be waited on again); other backends may not.
        sliced = self._sliced.get(group)
        if sliced is None:
            sliced = self._sliced[group] = dist.get_backend(group) == "gloo"
        return Exchange(phase, works, members, group, sends, recvs, send_counts, recv_counts,
                        check=self.verify and payload, sliced=sliced, role=role,
                        timed=timed if sliced else [], posted=time.monotonic())

    def wait(self, ex: Exchange) -> None:
        """Wait for ``ex`` within the call's deadline (idempotent); verify it if asked.

        Any failure becomes a typed flexep error naming the silent ranks of the whole EP group
        and poisons the transport.
        """
        if ex.done:
            return
        watcher: Optional[FailureWatcher] = None
        try:
            p2p = [w.work for w in ex.works if isinstance(w, _PointToPoint)]
            if p2p and ex.sliced:
                watcher = self._wait_p2p(ex, p2p, watcher)
            for w in ex.works:
                if not (ex.sliced and isinstance(w, _PointToPoint)):
                    watcher = self._wait_one(w, watcher, ex.sliced)
        except Exception as exc:  # noqa: BLE001 - every backend error is re-raised, typed
            raise self._failure(ex.phase, exc) from exc
        finally:
            if watcher is not None:
                watcher.stop()
        ex.done = True
        self.fault_point(f"after_{ex.phase}")
        if ex.check:
            from .verify import block_checksums, check_exchange

            check_exchange(self, ex.phase, block_checksums(ex.sends, ex.send_counts),
                           block_checksums(ex.recvs, ex.recv_counts), ex.members, ex.group)

    def all_to_all(self, phase: str, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor],
                   send_counts: Sequence[int], recv_counts: Sequence[int], **kw) -> None:
        """:meth:`start` then :meth:`wait`."""
        self.wait(self.start(phase, sends, recvs, send_counts, recv_counts, **kw))

    def all_gather(self, phase: str, t: torch.Tensor, *, group: Optional[dist.ProcessGroup] = None,
                   members: Optional[Sequence[int]] = None,
                   meanwhile: Optional[Callable[[], None]] = None) -> torch.Tensor:
        """All-gather a small 1-D tensor: ``[F] -> [G, F]`` on ``t``'s device (G = group size).

        Sent as an all-to-all of G copies rather than an all-gather: every pair talks directly,
        where Gloo's ring all-gather takes G - 1 dependent steps (measured on 4 ranks sharing 2
        cores: 2.7 ms vs 3.1 ms; 3 ranks: 0.9 ms vs 2.0 ms); the bytes received are the same.
        ``meanwhile`` runs after this rank's part is posted and before the wait: local work that
        hides the round's latency.
        """
        count = len(members) if members is not None else (group or self.group).size()
        rows = t.contiguous().view(1, -1).expand(count, -1).contiguous()
        out = torch.empty_like(rows)
        ex = self.start(phase, [rows], [out], [1] * count, [1] * count, group=group, members=members,
                        payload=False)
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            self.wait(ex)
        return out

    # ---- waiting and failures -------------------------------------------------------------
    def _wait_one(self, work, watcher: Optional[FailureWatcher],
                  sliceable: bool) -> Optional[FailureWatcher]:
        """Wait for ``work`` until the deadline; on Gloo, give up early if a peer reported a failure.

        An exchange need not connect a rank to the victim (a node or rail subgroup of the
        hierarchical exchange, a ring collective), so a rank whose partners are alive would only
        notice a dead peer at its own deadline, long after the ranks next to the victim. On Gloo
        the wait is therefore cut into slices; once a wait has lasted one slice, a watcher thread
        polls the store for a failure another rank posted. Gloo's point-to-point operations
        (channels) go through :meth:`_wait_p2p` instead. Other backends get one wait with the
        time left (a timed-out NCCL wait may abort).
        """
        p2p = isinstance(work, _PointToPoint)
        work = work.work if p2p else work
        while True:
            left = self.remaining()
            if left <= 0:
                raise TimeoutError("deadline passed before the wait started")
            sliced = sliceable and not p2p and left > SLICE
            try:
                work.wait(timeout=timedelta(seconds=SLICE if sliced else left))
                return watcher
            except RuntimeError as exc:
                if not sliced or "timed out" not in str(exc).lower():
                    raise
            if watcher is None:
                watcher = self.detector.watcher()
            if watcher.report is not None:
                raise RuntimeError(f"stopped waiting: {watcher.report}")

    def _wait_p2p(self, ex: Exchange, works: list,
                  watcher: Optional[FailureWatcher]) -> Optional[FailureWatcher]:
        """Wait for Gloo send/recv ``works`` until the deadline, giving up early on a posted failure.

        A timed Gloo send/recv wait that expires closes every connection of its group, and the
        works only complete inside ``wait``, so they cannot be waited on in slices or polled:
        helper threads wait on them once with the time left while this thread waits on the
        helpers in slices and consults the store, as :meth:`_wait_one` does for collectives.
        Receives whose arrival steers the channel weights (``ex.timed``) get a helper each, which
        notes when its rows were in. After an early stop the helpers stay blocked until the
        deadline (the transport is broken by then).
        """
        timed = {id(t[0].work) for t in ex.timed}
        batches = [[w] for w in works if id(w) in timed] + [[w for w in works if id(w) not in timed]]
        finished: dict = {}
        failed: list = []
        left = [len(batches)]
        lock, done = threading.Lock(), threading.Event()

        def wait_all(batch: list) -> None:
            try:
                for w in batch:
                    w.wait(timeout=timedelta(seconds=max(1e-3, self.remaining())))
                    finished[id(w)] = time.monotonic()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                failed.append(exc)
            finally:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

        for batch in batches:
            threading.Thread(target=wait_all, args=(batch,), name="flexep-p2p-wait", daemon=True).start()
        while not done.wait(SLICE):
            if watcher is None:
                watcher = self.detector.watcher()
            if watcher.report is not None:
                raise RuntimeError(f"stopped waiting: {watcher.report}")
        if failed:
            raise failed[0]
        if ex.timed:
            self._steer(ex.role, _arrivals(ex.timed, finished, ex.posted))
        return watcher

    def _failure(self, phase: str, exc: BaseException) -> FlexepRuntimeError:
        """Classify a failed wait, name the peers not heard from, and poison the transport."""
        text = str(exc)
        timed_out = isinstance(exc, TimeoutError) or "timed out" in text.lower() or "timeout" in text.lower()
        # The roll call spans the whole EP group: a hierarchical step runs on a node or rail
        # subgroup whose members may all be alive while the victim is elsewhere.
        report = f"rank {self.rank} in {self.op}/{phase}: {text.strip()[:300]}"
        missing = self.detector.roll_call(report, self.seq, self.timeout)
        who = f"rank(s) {missing}" if missing else "no rank identified (all answered the roll call)"
        kind = CommTimeoutError if timed_out else PeerFailureError
        what = f"timed out after {self.timeout:g} s" if timed_out else "lost a peer"
        err = kind(f"rank {self.rank} {what}; not heard from: {who}; backend said: {text.strip()[:300]}",
                   op=self.op, phase=phase, seq=self.seq, ranks=missing)
        self.broken = err
        return err


class _PointToPoint:
    """Marks an isend/irecv work, which :meth:`Transport._wait_one` must not wait on in slices."""

    __slots__ = ("work",)

    def __init__(self, work) -> None:
        self.work = work


def _channels(s: torch.Tensor, r: torch.Tensor, send_counts: list, recv_counts: list,
              lanes: list, me: int, weights: Optional[tuple] = None, timed: Optional[list] = None,
              members: Sequence[int] = (), row_bytes: int = 0) -> list:
    """Point-to-point on C groups; channel c carries the c-th contiguous row range per peer
    (cut evenly, or by ``weights = (send, recv)`` per peer). With ``timed`` given, every
    receive is listed there as ``(work, EP peer, channel, bytes)``."""
    works = []
    s_off, r_off = _offsets(send_counts), _offsets(recv_counts)
    num = len(lanes)
    for i in range(len(send_counts)):
        if i == me:
            r[r_off[i]:r_off[i + 1]].copy_(s[s_off[i]:s_off[i + 1]])
            continue
        recv_cut = cut(recv_counts[i], weights[1][i] if weights else None, num)
        send_cut = cut(send_counts[i], weights[0][i] if weights else None, num)
        for c, g in enumerate(lanes):
            lo, hi = recv_cut[c], recv_cut[c + 1]
            if hi > lo:
                work = _PointToPoint(dist.irecv(r[r_off[i] + lo:r_off[i] + hi], group=g,
                                                **_peer(g, i, "src")))
                works.append(work)
                if timed is not None:
                    timed.append((work, members[i], c, (hi - lo) * row_bytes))
            lo, hi = send_cut[c], send_cut[c + 1]
            if hi > lo:
                works.append(_PointToPoint(dist.isend(s[s_off[i] + lo:s_off[i] + hi], group=g,
                                                      **_peer(g, i, "dst"))))
    return works


# Point-to-point calls take group-relative peer ranks in recent torch releases; torch 2.4 takes
# only the global rank.
_GROUP_PEER = "group_src" in inspect.signature(dist.irecv).parameters


def _peer(group, peer: int, role: str) -> dict:
    """The keyword naming group rank ``peer`` as ``role`` (``"src"``/``"dst"``) of ``irecv``/``isend``."""
    if _GROUP_PEER:
        return {"group_" + role: peer}
    return {role: dist.get_global_rank(group, peer)}


def _offsets(counts: Sequence[int]) -> list[int]:
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


def chunk(n: int, parts: int, i: int) -> tuple[int, int]:
    """Row range of part ``i`` when ``n`` rows are cut into ``parts`` contiguous ranges.

    Example: n = 5, parts = 2 -> part 0 is ``(0, 3)``, part 1 is ``(3, 5)``.
    """
    size = (n + parts - 1) // parts
    return min(n, i * size), min(n, (i + 1) * size)


def _arrivals(timed: list, finished: dict, posted: float) -> dict:
    """EP peer -> ``[(channel, bytes, seconds)]``: per channel the bytes of every tensor received
    from the peer and when the last of them was in (seconds after posting)."""
    per_lane: dict = {}
    for work, peer, lane, nbytes in timed:
        b, t = per_lane.get((peer, lane), (0, 0.0))
        per_lane[(peer, lane)] = (b + nbytes, max(t, finished[id(work.work)] - posted))
    out: dict = {}
    for (peer, lane), (nbytes, t) in per_lane.items():
        out.setdefault(peer, []).append((lane, nbytes, t))
    return out


def steer(weights: Sequence[float], seconds: Sequence[float]) -> list[float]:
    """Channel weights moved towards equal arrival times, normalized to mean 1.

    If channel c took ``seconds[c]`` for its rows, rows in proportion to ``w_c / t_c`` would
    make the channels finish together when each path's rate is shared evenly by its flows; half
    that step (geometrically) is taken, as arrival times are noisy on a shared host, and no
    weight falls below 1/8 of the largest.

    Example: ``steer([1, 1], [1.0, 4.0]) -> [1.333, 0.667]`` (the slow channel halves its share
    relative to the other: ratio sqrt(4) = 2).
    """
    new = [w * math.sqrt(1.0 / max(t, 1e-9)) for w, t in zip(weights, seconds)]
    top = max(new)
    new = [max(v, top / 8) for v in new]
    total = sum(new)
    return [v * len(new) / total for v in new]


def cut(n: int, weights: Optional[Sequence[int]], parts: int) -> list[int]:
    """``[parts + 1]`` boundaries cutting ``n`` rows into ``parts`` contiguous ranges in proportion
    to integer ``weights`` (None: evenly, as :func:`chunk`). Integer arithmetic, so both ends of
    an exchange cut alike.

    Example: n = 10, weights [1, 3] -> ``[0, 2, 10]`` (floor(10 * 1 / 4) = 2).
    """
    if weights is None:
        return [chunk(n, parts, i)[0] for i in range(parts)] + [n]
    total, acc, out = sum(weights), 0, [0]
    for w in weights:
        acc += w
        out.append(n * acc // total)
    return out


# Each peer's published channel weights sum to this (integers travel in the control round).
WEIGHT_SUM = 1024
# Channels carrying fewer bytes than this do not steer the weights (their time is latency).
STEER_MIN_BYTES = 256 << 10


def _even(lanes: int) -> list[int]:
    return _quantize([1.0] * lanes)


def _quantize(w: Sequence[float]) -> list[int]:
    """Float weights -> integers summing to ``WEIGHT_SUM``, each at least 1."""
    total = sum(w)
    q = [max(1, int(v * WEIGHT_SUM / total)) for v in w]
    q[q.index(max(q))] += WEIGHT_SUM - sum(q)
    return q
