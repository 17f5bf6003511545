"""The control round: one small exchange per call that makes failures collective.

Before any payload moves, every rank publishes a fixed-width int64 row: the call it is making,
its sequence number, the membership generation, its local validation verdict, the arguments
that must agree across ranks, and the routing counts the algorithm needs. Every rank sees every
row, so all ranks reach the same verdict:

* a rank whose inputs failed validation raises its own ``ValueError``/``TypeError``; all others
  raise :class:`~flexep.errors.RemoteInputError` naming it, instead of waiting for it forever;
* ranks disagreeing on ``hidden``, dtype, ``num_experts``, top-k, mode, generation or call
  order raise :class:`~flexep.errors.RankMismatchError` naming the field and the ranks, before a
  payload of the wrong size can abort or silently corrupt an exchange;
* the send counts give every rank the full ``[W, W]`` count matrix; per-destination values
  (e.g. per-expert counts for the destination's experts) ride along.

Where the row travels (:class:`ControlPlane`):

* **on the call's device through the EP group** when the group can move tensors of that device
  (NCCL and HCCL groups for accelerator tensors, Gloo for CPU tensors). The routing counts never
  leave the device before the exchange; the received table is read on the host once, which is
  the one host read normal mode makes (DeepEP reads its receive counts once too). Value checks
  that would otherwise each read the device (``topk_idx`` range, consistency of the layout
  tensors) are folded into the row as a device-computed flag, so they cost no extra read.
* **on the host** otherwise: the EP group itself when it moves CPU tensors, else a CPU (Gloo)
  side group the communicator creates at construction. Low-latency calls use this plane with
  host-known values only (sizes, dtypes, modes), so they never read device memory and remain
  capturable in a CUDA graph.

The row has a fixed width that depends only on the group size and the call's kind, so it can
never itself be the mismatched message.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..device import group_carries
from ..errors import RankMismatchError, RemoteInputError, StaleGenerationError
from .transport import Transport

__all__ = ["Header", "ControlPlane", "dtype_code", "OPS", "ANY", "FIELDS"]

MAGIC = 0x464C4558  # "FLEX"
ANY = -2  # a field value that is not compared
OPS = {"dispatch": 1, "cached_dispatch": 2, "combine": 3, "ll_dispatch": 4, "ll_combine": 5,
       "barrier": 6, "ll_clean": 7, "init": 8, "sync_free_dispatch": 9, "sync_free_cached_dispatch": 10,
       "sync_free_combine": 11, "lb_prefetch": 12, "lb_reduce": 13}
_OP_NAMES = {v: k for k, v in OPS.items()}
FIELDS = ("magic", "op", "seq", "generation", "error", "num_tokens", "hidden", "x_dtype", "num_scales",
          "scale_dtype", "num_experts", "num_topk", "has_weights", "capacity", "mode",
          "num_worst_tokens", "rides", "ride_next", "bad_values")
# Per-rank values that ride along for every rank to read, never compared across ranks.
PER_RANK_FIELDS = ("num_tokens", "num_worst_tokens", "rides", "ride_next", "bad_values")
# Payload that may ride in a control round, bytes per peer (see ControlPlane.round): beyond it a
# call's payload has its own exchange and the round stays small.
RIDE_MAX = 256 << 10
_F = len(FIELDS)
_INDEX = {name: i for i, name in enumerate(FIELDS)}
_COMPARED = tuple(n for n in FIELDS[5:] if n not in PER_RANK_FIELDS)
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
    """What a control round returns, on the host.

    Attributes:
        fields: ``[W, F] int64``, every rank's fields (see ``FIELDS``).
        counts: ``[W, W] int64``, ``counts[s, d]`` = tokens rank s sends to rank d (zeros when
            the call carried no counts).
        extra: ``[W, X] int64``, per-rank vectors of a width every rank knows (e.g. node counts).
        per_dest: ``[W, Y] int64``, what each source published for *this* rank.
        ride: ``[W, Z] uint8``, the payload block each source sent this rank inside the round
            (its first bytes; the rest of the row is padding), or None when the call's payload
            did not ride on every rank (it then has an exchange of its own).
    """

    fields: torch.Tensor
    counts: torch.Tensor
    extra: torch.Tensor
    per_dest: torch.Tensor
    ride: Optional[torch.Tensor] = None

    def field(self, name: str) -> list[int]:
        return list(self._columns[_INDEX[name]])

    @cached_property
    def _columns(self) -> list[tuple]:
        """The fields table as host columns, read once (a verdict reads most of them)."""
        return list(zip(*self.fields.tolist())) if self.fields.size(0) else [()] * _F


class ControlPlane:
    """Runs control rounds for one EP group (see the module docstring for where rows travel).

    Every round of one communicator has the same width, whatever the call, so that ranks making
    different calls still exchange rows of one size and can tell each other apart:
    ``len(FIELDS) + W + extra_width + per_dest_width``. Both widths are agreed state: set at
    construction (``extra_width``, the algorithm's) or changed only after a verdict every rank
    reached (``per_dest_width``).

    Args:
        tp: the EP group's transport (deadlines, failures, accounting).
        host_group: a CPU-capable group over the same ranks, or None when the EP group itself
            moves CPU tensors.
        generation: membership generation; rows of another generation are refused.
    """

    def __init__(self, tp: Transport, host_group: Optional[dist.ProcessGroup] = None,
                 generation: int = 0) -> None:
        self.tp = tp
        self.host_group = host_group if host_group is not None else tp.group
        self.generation = generation
        self.extra_width = 0
        self.per_dest_width = 0
        self.ride_bytes = 0
        self._needs = (0, 0)
        self._device_types: dict = {}

    def _on_device(self, device: torch.device) -> bool:
        if device.type == "cpu":
            return False
        if device.type not in self._device_types:
            self._device_types[device.type] = group_carries(self.tp.group, device.type)
        return self._device_types[device.type]

    def round(self, op: str, *, device: Optional[torch.device] = None,
              error: Optional[BaseException] = None, check: bool = True,
              send_counts: Optional[torch.Tensor] = None, extra: Optional[torch.Tensor] = None,
              per_dest: Optional[torch.Tensor] = None, bad_values: Optional[torch.Tensor] = None,
              explain: Optional[Callable[[], BaseException]] = None,
              meanwhile: Optional[Callable[[], None]] = None,
              ride: Optional[Sequence[torch.Tensor]] = None, offer: Optional[int] = None,
              **values: int) -> Header:
        """Run the control round of call ``op`` and raise collectively on any disagreement.

        Args:
            device: where the call's tensors live (None: host-known values only).
            error: a local input error, shipped as a flag and re-raised here once every peer
                has been told.
            check: compare the agreement fields (``values``) across ranks.
            send_counts: ``[W]`` tokens this rank sends to each rank (on ``device``).
            extra: ``[extra_width]`` per-rank values every rank reads (on ``device``).
            per_dest: ``[W, Y]`` values for each destination (on ``device``), ``Y <=
                per_dest_width`` (zero-padded).
            bad_values: a 0-dim integer tensor on ``device``, non-zero when a device-side value
                check failed; ``explain()`` then builds the local error (it may read the host).
            meanwhile: local work run while the round is in flight.
            ride: the call's payload for each destination rank, ``[n_d, B] uint8`` blocks
                (this rank's own is not sent), to ride in the round when they fit: a small
                payload then needs no exchange of its own (see :meth:`_frames`).
            offer: bytes of this call's largest block for another rank (given whether or not
                ``ride`` is): the bid for the next rounds' ride size.
            values: the agreement fields by name (unset fields are not compared).
        """
        world, extra_width, per_dest_width = self.tp.world, self.extra_width, self.per_dest_width
        on_device = device is not None and self._on_device(device)
        dev = device if on_device else torch.device("cpu")
        fields = [ANY] * _F
        fields[0], fields[1], fields[2] = MAGIC, OPS[op], self.tp.seq
        fields[3], fields[4] = self.generation, int(error is not None)
        for name, v in values.items():
            fields[_INDEX[name]] = int(v)
        ok = error is None
        rides = ok and ride is not None and not on_device and self.ride_bytes > 0 and all(
            b.numel() <= self.ride_bytes for d, b in enumerate(ride) if d != self.tp.rank)
        fields[_INDEX["rides"]] = int(rides)
        fields[_INDEX["ride_next"]] = self._proposal(offer if ok else None)
        if on_device:  # built on the device: nothing is read back
            head = torch.tensor(fields, dtype=torch.int64, device=dev)
            if ok and bad_values is not None:
                head[_F - 1] = bad_values.to(device=dev, dtype=torch.int64)
            row = torch.cat([head, _part(send_counts if ok else None, world, dev),
                             _part(extra if ok else None, extra_width, dev)])
        else:  # a host row: one tensor from the values (each part crosses to the host once, as before)
            if ok and bad_values is not None:
                fields[_F - 1] = int(bad_values.cpu())
            row = torch.tensor(fields + _values(send_counts if ok else None, world)
                               + _values(extra if ok else None, extra_width), dtype=torch.int64)
        self.tp.fault_point("before_header")
        if rides:  # the payload leaves with the header
            self.tp.fault_point("before_payload")
        group = self.tp.group if on_device or self.host_group is self.tp.group else self.host_group
        if self.ride_bytes:
            return self._frames(op, row, per_dest if ok else None, ride if rides else None, group,
                                error, check, explain, meanwhile)
        if per_dest_width:
            dest = torch.zeros(world, per_dest_width, dtype=torch.int64, device=dev)
            if ok and per_dest is not None:
                dest[:, :per_dest.size(1)] = per_dest
            rows = torch.cat([row.view(1, -1).expand(world, -1), dest], 1).contiguous()
            out = torch.empty_like(rows)
            ex = self.tp.start("header", [rows], [out], [1] * world, [1] * world, group=group,
                               payload=False)
            try:
                if meanwhile is not None:
                    meanwhile()
            finally:
                self.tp.wait(ex)
            table = out
        else:
            table = self.tp.all_gather("header", row, group=group, meanwhile=meanwhile)
        table = table.cpu()  # the call's one host read (free when the rows were on the host)
        header = self._header(table, None)
        self.verdict(op, header, error, check, explain)
        return header

    def _header(self, table: torch.Tensor, ride: Optional[torch.Tensor]) -> Header:
        """The round's :class:`Header` from its ``[W, width]`` host table; agrees the next
        round's ride size from it first, so every rank moves on alike whatever the verdict."""
        world, width = self.tp.world, self.tp.world + self.extra_width
        header = Header(fields=table[:, :_F], counts=table[:, _F:_F + world],
                        extra=table[:, _F + world:_F + width], per_dest=table[:, _F + width:])
        self.ride_bytes = min(RIDE_MAX, _round_up(max(header.field("ride_next")), _RIDE_ALIGN))
        if ride is not None and all(v == 1 for v in header.field("rides")):
            return Header(header.fields, header.counts, header.extra, header.per_dest, ride)
        return header

    # ---- payload riding in the round --------------------------------------------------------
    def _proposal(self, offer: Optional[int]) -> int:
        """This rank's bid for the next round's ride size: the largest block of its last two
        calls that offered a payload (a layer's dispatch and combine alternate), with a quarter
        more for the routing's next draw; a block over :data:`RIDE_MAX` bids nothing."""
        if offer is not None:
            self._needs = (self._needs[1], offer if offer <= RIDE_MAX else 0)
        need = max(self._needs)
        return min(RIDE_MAX, need + need // 4)

    def _frames(self, op: str, row: torch.Tensor, per_dest: Optional[torch.Tensor],
                ride: Optional[Sequence[torch.Tensor]], group, error, check: bool, explain,
                meanwhile) -> Header:
        """The round as one frame per destination: the row, the per-destination values, then
        ``ride_bytes`` bytes that carry the call's payload block for that rank when ``ride``
        is given (every block fits; the row's ``rides`` field says so), else padding.

        Every frame of a round has the agreed size whatever call each rank makes, so a
        mismatch is still named by the verdict and never aborts the exchange; a payload that
        rode on every rank needs no exchange of its own (one round instead of two). The size
        is agreed in the previous round (``ride_next``: the largest block a rank offered in
        its last two calls, up to :data:`RIDE_MAX`), so it follows the workload and is 0
        where nothing rides.
        """
        world, tp = self.tp.world, self.tp
        dev = row.device
        dest = torch.zeros(world, self.per_dest_width, dtype=torch.int64, device=dev)
        if per_dest is not None and self.per_dest_width:
            dest[:, :per_dest.size(1)] = per_dest
        head = torch.cat([row.view(1, -1).expand(world, -1), dest], 1)
        head_bytes = head.size(1) * 8
        frames = torch.empty(world, head_bytes + self.ride_bytes, dtype=torch.uint8, device=dev)
        frames[:, :head_bytes].view(torch.int64).copy_(head)
        sizes = [0] * world
        if ride is not None:
            for d, block in enumerate(ride):
                if d != tp.rank and block.numel():
                    sizes[d] = block.numel()
                    frames[d, head_bytes:head_bytes + sizes[d]].copy_(block.reshape(-1))
        out = torch.empty_like(frames)
        ex = tp.start("header", [frames], [out], [1] * world, [1] * world, group=group, payload=False)
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            tp.wait(ex)
        out = out.cpu()
        header = self._header(out[:, :head_bytes].view(torch.int64),
                              out[:, head_bytes:] if ride is not None else None)
        if header.ride is not None:  # it rode on every rank: those bytes are payload
            for d, n in enumerate(sizes):
                if n:
                    tp.stats.reclassify(tp.topo.link_class(tp.rank, d), n)
            # this rank's own block is a local copy, as in an exchange
            tp.stats.record(tp.topo.link_class(tp.rank, tp.rank), ride[tp.rank].numel(), True)
        self.verdict(op, header, error, check, explain)
        return header

    def verdict(self, op: str, h: Header, error, check: bool, explain) -> None:
        """Raise as a round of ``op`` with table ``h`` would (every rank reaches the same verdict
        from the same table); used directly by checks that travel in the payload."""
        tp = self.tp
        kw = dict(op=op, phase="header", seq=tp.seq)
        bad_magic = [r for r, m in enumerate(h.field("magic")) if m != MAGIC]
        if bad_magic:
            raise RankMismatchError(f"rank(s) {bad_magic} sent a malformed header (not a flexep call "
                                    "of the same version at the same point)", ranks=bad_magic, **kw)
        gens = h.field("generation")
        if len(set(gens)) > 1:
            old = [r for r, g in enumerate(gens) if g != max(gens)]
            raise StaleGenerationError(
                f"ranks are in different membership generations ({gens}); rank(s) {old} belong to an "
                "older group and are refused: rebuild them from the current membership", ranks=old,
                generation=self.generation, current=max(gens), **kw)
        flagged = [r for r, e in enumerate(h.field("bad_values")) if e not in (0, ANY)]
        rejected = sorted({r for r, e in enumerate(h.field("error")) if e} | set(flagged))
        if error is not None:
            raise error
        if tp.rank in flagged and explain is not None:
            raise explain()
        if rejected:
            raise RemoteInputError(
                f"rank(s) {rejected} rejected their inputs to {op}; see the ValueError/TypeError "
                "raised on those ranks", ranks=rejected, **kw)
        if not check:
            return
        ops, seqs = h.field("op"), h.field("seq")
        if len(set(zip(ops, seqs))) > 1:
            calls = ", ".join(f"rank {r}: {_OP_NAMES.get(o, o)} #{s}"
                              for r, (o, s) in enumerate(zip(ops, seqs)))
            odd = _minority(list(zip(ops, seqs)))
            raise RankMismatchError(f"ranks are not making the same call ({calls}); every rank must "
                                    "call the same methods in the same order", ranks=odd, **kw)
        for name in _COMPARED:
            vals = h.field(name)
            if len({v for v in vals if v != ANY}) <= 1:
                continue
            shown = [_dtype_name(v) if name.endswith("dtype") else v for v in vals]
            odd = _minority(vals)
            raise RankMismatchError(
                f"ranks disagree on {name}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
                + f"; it must be equal on all ranks (odd one(s) out: {odd})", ranks=odd, **kw)


_RIDE_ALIGN = 64


def _round_up(n: int, step: int) -> int:
    return -(-max(0, n) // step) * step


def _part(t: Optional[torch.Tensor], width: int, device: torch.device) -> torch.Tensor:
    if t is None:
        return torch.zeros(width, dtype=torch.int64, device=device)
    return t.to(device=device, dtype=torch.int64).reshape(width)


def _values(t: Optional[torch.Tensor], width: int) -> list[int]:
    """``t`` (any device, ``width`` values) as host ints; zeros when None."""
    if t is None:
        return [0] * width
    return t.cpu().reshape(width).tolist()


def _minority(vals: Sequence) -> list[int]:
    """Ranks whose value differs from the most common one (ties: the value of rank 0 wins)."""
    common = max(set(vals), key=lambda v: (list(vals).count(v), v == vals[0]))
    return [r for r, v in enumerate(vals) if v != common]
