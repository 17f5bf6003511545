"""The per-call header round: one small all-gather that makes failures collective.

Before moving any payload, every rank publishes a fixed-width int64 header: the call it is
making, its sequence number, its local validation verdict, the arguments that must agree
across ranks, and how many tokens it sends to each peer. Every rank sees every header, so all
ranks reach the same verdict:

* a rank whose inputs failed validation raises its own ``ValueError``/``TypeError``; all others
  raise :class:`~flexep.errors.RemoteInputError` naming it, instead of waiting for it forever;
* ranks disagreeing on ``hidden``, dtype, ``num_experts``, top-k, mode or call order raise
  :class:`~flexep.errors.RankMismatchError` naming the field and the ranks, before a payload of
  the wrong size can abort or silently corrupt a Gloo exchange;
* the send counts give every rank the full ``[W, W]`` traffic matrix, which dispatch needs anyway.

The header has a fixed width that depends only on the group size, so it can never itself be
the mismatched message. Local work that does not depend on the verdict (dispatch gathering its
send rows) runs while the round is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .errors import RankMismatchError, RemoteInputError
from .transport import Transport

__all__ = ["Header", "header_round", "dtype_code", "OPS", "ANY"]

MAGIC = 0x464C4558  # "FLEX"
ANY = -2  # a field value that is not compared
OPS = {"dispatch": 1, "cached_dispatch": 2, "combine": 3, "ll_dispatch": 4, "ll_combine": 5,
       "barrier": 6, "ll_clean": 7}
_OP_NAMES = {v: k for k, v in OPS.items()}
FIELDS = ("magic", "op", "seq", "error", "num_tokens", "hidden", "x_dtype", "num_scales",
          "scale_dtype", "num_experts", "num_topk", "has_weights", "capacity", "mode",
          "num_worst_tokens")
# Per-rank values that ride along for every rank to read, never compared across ranks.
PER_RANK_FIELDS = ("num_tokens", "num_worst_tokens")
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8, torch.int8,
           torch.int32, torch.int64, torch.bool]
_DTYPES += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


def dtype_code(dtype: Optional[torch.dtype]) -> int:
    """Stable small integer for a dtype (``-1`` for None)."""
    if dtype is None:
        return -1
    return _DTYPES.index(dtype) if dtype in _DTYPES else 99


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]).replace("torch.", "") if 0 <= code < len(_DTYPES) else f"code {code}"


@dataclass(frozen=True)
class Header:
    """What the header round returns: every rank's fields and the ``[W, W]`` count matrix."""

    fields: torch.Tensor  # [W, F] int64
    counts: torch.Tensor  # [W, W] int64, counts[s, d] = tokens rank s sends to rank d
    extra: torch.Tensor  # [W, X] int64, the per-rank ``extra`` vectors (X may be 0)

    def field(self, name: str) -> list[int]:
        return self.fields[:, FIELDS.index(name)].tolist()


def header_round(tp: Transport, op: str, *, error: Optional[BaseException] = None,
                 send_counts: Optional[torch.Tensor] = None, check: bool = True,
                 extra_width: int = 0, extra: Optional[torch.Tensor] = None,
                 meanwhile: Optional[Callable[[], None]] = None, **values: int) -> Header:
    """Run the header round for call ``op`` and raise collectively on any disagreement.

    ``values`` fills the agreement fields by name (unset fields are not compared). A local
    ``error`` is shipped as a flag and re-raised here, after every peer has been told.
    ``extra`` (``[extra_width]``, a width every rank knows, e.g. from the topology) rides along.
    ``meanwhile`` is local work run while the round is in flight (see ``Transport.all_gather``).
    """
    world = tp.world
    row = torch.full((len(FIELDS) + world + extra_width,), ANY, dtype=torch.int64)
    row[FIELDS.index("magic")] = MAGIC
    row[FIELDS.index("op")] = OPS[op]
    row[FIELDS.index("seq")] = tp.seq
    row[FIELDS.index("error")] = int(error is not None)
    for name, v in values.items():
        row[FIELDS.index(name)] = int(v)
    ok = error is None
    end = len(FIELDS) + world
    row[len(FIELDS):end] = send_counts.to(torch.int64).cpu() if ok and send_counts is not None else 0
    row[end:] = extra.to(torch.int64).cpu() if ok and extra is not None else 0
    tp.fault_point("before_header")
    table = tp.all_gather("header", row, meanwhile=meanwhile)
    header = Header(fields=table[:, : len(FIELDS)], counts=table[:, len(FIELDS):end], extra=table[:, end:])
    _raise_on_disagreement(tp, op, header, error, check)
    return header


def _raise_on_disagreement(tp: Transport, op: str, h: Header, error, check: bool) -> None:
    kw = dict(op=op, phase="header", seq=tp.seq)
    bad_magic = [r for r, m in enumerate(h.field("magic")) if m != MAGIC]
    if bad_magic:
        raise RankMismatchError(f"rank(s) {bad_magic} sent a malformed header (not a flexep call "
                                "of the same version at the same point)", ranks=bad_magic, **kw)
    rejected = [r for r, e in enumerate(h.field("error")) if e]
    if error is not None:
        raise error
    if rejected:
        raise RemoteInputError(
            f"rank(s) {rejected} rejected their inputs to {op}; see the ValueError/TypeError "
            "raised on those ranks", ranks=rejected, **kw)
    if not check:
        return
    ops, seqs = h.field("op"), h.field("seq")
    if len(set(zip(ops, seqs))) > 1:
        calls = ", ".join(f"rank {r}: {_OP_NAMES.get(o, o)} #{s}" for r, (o, s) in enumerate(zip(ops, seqs)))
        odd = _minority(list(zip(ops, seqs)))
        raise RankMismatchError(f"ranks are not making the same call ({calls}); every rank must "
                                "call the same Buffer methods in the same order", ranks=odd, **kw)
    for name in FIELDS[4:]:
        vals = h.field(name)
        compared = [v for v in vals if v != ANY]
        if name in PER_RANK_FIELDS or len(set(compared)) <= 1:
            continue
        shown = [_dtype_name(v) if name.endswith("dtype") else v for v in vals]
        odd = _minority(vals)
        raise RankMismatchError(
            f"ranks disagree on {name}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
            + f"; it must be equal on all ranks (odd one(s) out: {odd})", ranks=odd, **kw)


def _minority(vals: Sequence) -> list[int]:
    """Ranks whose value differs from the most common one (ties: the value of rank 0 wins)."""
    common = max(set(vals), key=lambda v: (list(vals).count(v), v == vals[0]))
    return [r for r, v in enumerate(vals) if v != common]
