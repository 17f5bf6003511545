"""Exception types.

Input errors are plain ``ValueError``/``TypeError`` naming the argument. Everything that goes
wrong *between* ranks is a :class:`FlexepRuntimeError` (a ``RuntimeError``, as DeepEP and torch
raise), carrying the operation, phase, sequence number and the ranks involved; the backend's own
exception, when there is one, is the ``__cause__``.
"""

from __future__ import annotations

from typing import Sequence

__all__ = [
    "FlexepRuntimeError",
    "CommTimeoutError",
    "PeerFailureError",
    "RankMismatchError",
    "RemoteInputError",
    "CapacityError",
    "BrokenCommunicatorError",
    "ConservationError",
    "StaleGenerationError",
]


class FlexepRuntimeError(RuntimeError):
    """A failure that involves other ranks.

    Attributes:
        op: the public call (``"dispatch"``, ``"combine"``, ...).
        phase: the exchange inside it (``"header"``, ``"payload"``, ...).
        seq: the buffer's sequence number of the call (equal on all ranks for one call).
        ranks: the group ranks the error is about (peers not heard from, disagreeing ranks, ...).
    """

    def __init__(self, message: str, *, op: str = "", phase: str = "", seq: int = -1,
                 ranks: Sequence[int] = ()) -> None:
        where = ", ".join(p for p in (op, phase, f"seq {seq}" if seq >= 0 else "") if p)
        super().__init__(f"{message} [{where}]" if where else message)
        self.op, self.phase, self.seq, self.ranks = op, phase, seq, tuple(ranks)


class CommTimeoutError(FlexepRuntimeError, TimeoutError):
    """A wait passed ``Buffer(timeout=...)``; ``ranks`` are the peers not heard from."""


class PeerFailureError(FlexepRuntimeError):
    """A peer closed its connection (process died); ``ranks`` are the peers not heard from."""


class RankMismatchError(FlexepRuntimeError):
    """Ranks called the same operation with arguments that must agree but do not."""


class RemoteInputError(FlexepRuntimeError, ValueError):
    """Another rank rejected its inputs; raised on every rank so no rank waits for it."""


class CapacityError(FlexepRuntimeError, ValueError):
    """More tokens than a fixed-capacity buffer holds; nothing is truncated."""


class BrokenCommunicatorError(FlexepRuntimeError):
    """A previous communication failure left the group unusable; rebuild group and Buffer."""


class ConservationError(FlexepRuntimeError):
    """Verify mode found tokens or bytes lost or altered between a sender and a receiver."""


class StaleGenerationError(RankMismatchError):
    """A rank holds an older membership generation than the group it talks to.

    Raised on every rank of a control round that mixes generations (``ranks`` are the stale
    ones), and by :mod:`flexep.elastic` on a process that finds itself excluded from the newest
    membership (e.g. it was frozen while the others recovered without it). The stale process
    must not rejoin the old group: it rejoins as a new member (``ElasticEP(join=True)``).

    Attributes:
        generation: the generation the raising process holds (-1 when unknown).
        current: the newest generation known (-1 when unknown).
    """

    def __init__(self, message: str, *, generation: int = -1, current: int = -1, **kw) -> None:
        super().__init__(message, **kw)
        self.generation, self.current = generation, current
