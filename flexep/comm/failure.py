"""Failure detection: who is not answering, found through the rendezvous store.

When an exchange fails or passes its deadline, the backend's error rarely says which peer is to
blame (a Gloo ring fails at a neighbour of the dead rank; a hierarchical step runs on a subgroup
whose members may all be alive). flexep then runs a **roll call** over the whole EP group through
the store every ``torch.distributed`` group already has: each survivor posts a key and waits a
short window for the others; a dead or frozen rank never posts. Survivors also post a
**failure report**, and ranks still blocked in a wait that cannot see the victim directly watch
for it (:class:`FailureWatcher`) and stop early.

Store calls can block forever when the store's host is frozen (SIGSTOP), so they run on helper
threads joined with a deadline; a store that is gone or silent means its host is the one not
heard from.
"""

from __future__ import annotations

import threading
import time
from typing import Optional, Sequence

import torch.distributed as dist

__all__ = ["FailureDetector", "FailureWatcher", "default_store"]

SLICE = 0.25  # seconds a sliced wait runs before the watcher starts / is consulted


def default_store():
    """The default group's rendezvous store, or None when there is none."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - e.g. a group built without init_process_group
        return None


class FailureDetector:
    """Roll calls and failure reports for one EP group (one per ``Transport``).

    Args:
        uid: the communicator's id, shared by its ranks (names the store keys).
        rank: this rank in the EP group. world: the EP group size.
        store_host: EP rank of the process hosting the store (global rank 0), or None.
    """

    def __init__(self, uid: int, rank: int, world: int, store_host: Optional[int]) -> None:
        self.uid, self.rank, self.world, self.store_host = uid, rank, world, store_host

    @property
    def failure_key(self) -> str:
        return f"flexep/{self.uid}/failed"

    def watcher(self) -> FailureWatcher:
        return FailureWatcher(self.failure_key)

    def roll_call(self, report: str, seq: int, timeout: float) -> list[int]:
        """EP ranks that do not answer within a short window (after posting ``report``).

        The key is per communicator and rank, not per call: a transport holds at most one roll
        call (it is broken afterwards), and survivors that fail in different calls (one finished
        the exchange, the other did not) still find each other.
        """
        store = default_store()
        if store is None:  # no store means no evidence, not a new failure
            return []
        window = min(5.0, max(1.0, timeout / 4))
        result: dict = {}
        peers = [p for p in range(self.world) if p != self.rank]
        helper = threading.Thread(target=self._answer, name="flexep-roll-call", daemon=True,
                                  args=(store, peers, window, report, seq, result))
        helper.start()
        helper.join(window + 1.0)
        if "missing" in result:
            return list(result["missing"])
        host = self.store_host
        return [host] if host is not None and host != self.rank else []

    def _answer(self, store, peers: Sequence[int], window: float, report: str, seq: int,
                result: dict) -> None:
        """Post the failure and this rank's key, then poll the peers' keys for ``window`` s."""
        prefix = f"flexep/{self.uid}/rollcall/"
        try:
            store.set(self.failure_key, report)
            store.set(prefix + str(self.rank), str(seq))
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


class FailureWatcher:
    """Daemon thread polling the store for a failure posted by another rank.

    ``report`` becomes the posted text once seen. The thread may stay blocked inside a store
    call if the store's host is frozen; it is a daemon, and the caller only ever reads
    ``report`` (the roll call that follows has its own deadline).
    """

    def __init__(self, key: str) -> None:
        self.key, self.report = key, None
        self._stop = threading.Event()
        self._store = default_store()
        if self._store is not None:
            threading.Thread(target=self._poll, name="flexep-failure-watcher", daemon=True).start()

    def _poll(self) -> None:
        try:
            while not self._stop.is_set():
                if self._store.check([self.key]):
                    self.report = self._store.get(self.key).decode(errors="replace")
                    return
                self._stop.wait(SLICE)
        except Exception:  # noqa: BLE001 - a dead store: the waits still end at the deadline
            return

    def stop(self) -> None:
        self._stop.set()
