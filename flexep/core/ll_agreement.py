"""Low-latency call checks that ride in the payload: no extra round per call.

Normal mode checks every call in a control round before any payload moves (:mod:`flexep.comm.
control`): a bad input or a disagreement on any rank then raises on every rank, and a payload
of the wrong size never meets the backend (Gloo aborts the process on a size mismatch). In
low-latency mode that round is one extra exchange per call, as expensive as the payload itself
for a few decode tokens. Where the payload lands on the host (a Gloo group moving CPU tensors),
flexep checks in-band instead:

* the first call of each kind (dispatch, combine) runs the full control round and *pins* the
  frame it agreed on: rows per peer and bytes per row;
* every later call sends a 32-byte header in each row (:func:`header`): call, sequence number,
  membership generation, status and the fields that must agree. A rank whose call still fits
  the pinned frame sends its data; a rank whose inputs are invalid, or whose call needs another
  frame size, sends a frame of the pinned size that carries only the header (a *probe*), so the
  exchange always completes;
* every rank reads every peer's header before using any data (:meth:`InBand.verdict`, the
  normal control round's verdict): an input error raises on every rank, a disagreement raises
  :class:`~flexep.errors.RankMismatchError` naming the field on every rank, and when every rank
  probed with the same new call the frame is re-pinned and the call re-sent.

On accelerators the received header is device memory, and reading it would be a host read, so
calls there keep the control round (host values only). ``check_consistency=False`` skips both.

Header words (int64): ``magic16 | op8 | status8 | generation32``, ``seq32 | num_tokens32``,
``hidden32 | num_experts32``, ``capacity32 | num_topk8 | x_dtype8 | mode16``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..comm.control import ANY, FIELDS, MAGIC, OPS, ControlPlane, Header

__all__ = ["InBand", "header", "OK", "ERROR", "PROBE"]

OK, ERROR, PROBE = 0, 1, 2
_MAGIC16 = 0x4C4C
_M32 = 0xFFFFFFFF
_PHASE = {"ll_dispatch": "ll_dispatch", "ll_combine": "ll_weights"}  # the exchange carrying the header


def header(op: str, seq: int, generation: int, status: int, values: Optional[dict] = None) -> torch.Tensor:
    """``[4] int64`` header of one call (``values``: the agreement fields, absent on error)."""
    v = values or {}
    words = [
        _MAGIC16 << 48 | OPS[op] << 40 | status << 32 | (generation & _M32),
        (seq & 0x7FFFFFFF) << 32 | (v.get("num_tokens", 0) & _M32),
        (v.get("hidden", 0) & 0x7FFFFFFF) << 32 | (v.get("num_experts", 0) & _M32),
        (v.get("capacity", 0) & 0x7FFFFFFF) << 32 | (v.get("num_topk", 0) & 0xFF) << 24
        | (v.get("x_dtype", 0) & 0xFF) << 16 | (v.get("mode", 0) & 0xFFFF),
    ]
    return torch.tensor(words, dtype=torch.int64)


def _fields(words: list, with_values: bool) -> list:
    """One rank's control-round field row (:data:`~flexep.comm.control.FIELDS`) from its header."""
    w0, w1, w2, w3 = words
    row = [ANY] * len(FIELDS)
    named = dict(magic=MAGIC if (w0 >> 48) & 0xFFFF == _MAGIC16 else 0, op=(w0 >> 40) & 0xFF,
                 error=int((w0 >> 32) & 0xFF == ERROR), generation=w0 & _M32, seq=(w1 >> 32) & 0x7FFFFFFF,
                 num_tokens=w1 & _M32)
    if with_values:
        named.update(hidden=(w2 >> 32) & 0x7FFFFFFF, num_experts=w2 & _M32, capacity=(w3 >> 32) & 0x7FFFFFFF,
                     num_topk=(w3 >> 24) & 0xFF, x_dtype=(w3 >> 16) & 0xFF, mode=w3 & 0xFFFF)
    for name, value in named.items():
        row[FIELDS.index(name)] = value
    return row


class InBand:
    """Pinned frames and the in-band verdict of one communicator's low-latency calls.

    Attributes:
        pinned: per call kind (``"ll_dispatch"``, ``"ll_combine"``), the agreed frame
            ``(rows per peer, bytes per row, header offset)``, or absent before the first call.
    """

    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.pinned: dict = {}

    def call(self, comm, op: str, error: Optional[BaseException], values: Callable[[], dict],
             frame: Optional[tuple], launch: Callable):
        """Run ``launch(header, verify)`` for call ``op`` of communicator ``comm`` under these
        checks; raises on every rank as the control round would.

        ``frame``: ``(rows per peer, bytes per row, header offset)`` of this call (None on a
        local ``error``); ``values()``: its agreement fields.
        """
        tp, gen = comm.transport, self.control.generation
        pinned = self.pinned.get(op)
        if pinned is None:  # the first call of its kind: a full round, then the frame is pinned
            comm._agreement(op, error, values)
            pinned = self.pinned[op] = frame
        if error is not None or frame != pinned:
            status = ERROR if error is not None else PROBE
            probe = header(op, tp.seq, gen, status, None if error is not None else values())
            rows, nbytes, offset = pinned
            got = comm.low_latency.probe(_PHASE[op], rows, nbytes, offset, probe, torch.device("cpu"))
            self.verdict(op, got, error)  # raises unless every rank probed with this same call
            self.pinned[op] = frame
        return launch(header(op, tp.seq, gen, OK, values()), lambda got: self.verdict(op, got))

    def verdict(self, op: str, headers: torch.Tensor, error: Optional[BaseException] = None) -> str:
        """Check every rank's header (``[W, 4] int64`` on the host); raise as the control round
        does, else return ``"ok"`` (every rank sent data) or ``"repin"`` (every rank probed
        with the same new call: re-pin and send again)."""
        rows = headers.tolist()
        # The common case in one comparison: every rank sent data for the same call (the only
        # per-rank field, num_tokens, sits in the low half of word 1).
        first = rows[0]
        if (first[0] >> 48) & 0xFFFF == _MAGIC16 and (first[0] >> 32) & 0xFF == OK and all(
                w[0] == first[0] and w[1] >> 32 == first[1] >> 32 and w[2:] == first[2:] for w in rows):
            if error is None and (first[0] >> 40) & 0xFF == OPS[op] and (first[1] >> 32) == (
                    self.control.tp.seq & 0x7FFFFFFF) and first[0] & _M32 == self.control.generation & _M32:
                return "ok"
        statuses = [(w[0] >> 32) & 0xFF for w in rows]
        table = torch.tensor([_fields(w, s != ERROR) for w, s in zip(rows, statuses)], dtype=torch.int64)
        world = len(rows)
        empty = torch.zeros(world, 0, dtype=torch.int64)
        self.control.verdict(op, Header(fields=table, counts=torch.zeros(world, world, dtype=torch.int64),
                                        extra=empty, per_dest=empty), error, True, None)
        if all(s == OK for s in statuses):
            return "ok"
        if all(s == PROBE for s in statuses):
            return "repin"
        from ..errors import RankMismatchError

        odd = [r for r, s in enumerate(statuses) if s != statuses[self.control.tp.rank]]
        raise RankMismatchError(
            f"ranks agree on the call but not on its frame (statuses {statuses}); every rank must make "
            "the same low-latency calls with the same arguments", op=op, phase="header",
            seq=self.control.tp.seq, ranks=odd)
