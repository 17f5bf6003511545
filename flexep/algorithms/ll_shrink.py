"""Shrink mode: low-latency exchanges that mask a silent peer instead of failing.

DeepEP V1's ``Buffer(..., enable_shrink=True)`` keeps a per-rank *mask*: a rank neither sends to
nor waits for a masked peer, and a receive that times out masks its peer instead of trapping.
A collective cannot do that -- one missing member stalls everyone, and on Gloo a failed
collective leaves its group unusable -- so in shrink mode flexep moves low-latency data point to
point through the rendezvous store every ``torch.distributed`` group already has:

* each exchange has a number, equal on every rank making the same calls; the block for peer p
  is stored under ``(exchange, src, dst)`` and deleted once read, so a late message from a
  masked peer never matches a later exchange;
* a receiver polls each unmasked peer's key until the exchange's deadline (``timeout`` seconds
  after it starts waiting); a peer still silent then is masked (with a warning, as DeepEP
  prints), and its block reads as "nothing sent" (:class:`Posted` ``empty``);
* the shrink barrier (``clean_low_latency_buffer``) is the same with empty blocks.

The mask is local state, as in DeepEP: every survivor reaches the same mask because each waits
for every peer itself. Blocks travel through host memory (tensors on an accelerator are copied),
so shrink mode trades DeepEP's no-host-read property for surviving a lost rank; the store's host
(global rank 0) must survive.
"""

from __future__ import annotations

import ctypes
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..comm.failure import default_store
from ..comm.transport import Transport

__all__ = ["ShrinkLink", "Posted"]

_POLL_MIN, _POLL_MAX = 0.0002, 0.01  # seconds between polls of one key (grows while waiting)


def _to_bytes(t: torch.Tensor) -> bytes:
    t = t.to("cpu").contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""


@dataclass
class Posted:
    """An exchange whose blocks are stored and whose receive blocks are not read yet.

    ``empty(block)`` fills the receive block of a masked or silent peer (``[Q, ...]``).
    """

    phase: str
    number: int
    recv: torch.Tensor
    empty: Callable[[torch.Tensor], None]
    done: bool = False


class ShrinkLink:
    """Store-based point-to-point exchanges with a per-peer mask (see the module docstring).

    Args:
        uid: the communicator's id (shared by its ranks; names the keys).
        tp: the EP group's transport (rank, world, ``timeout`` per wait, accounting).
        store: a ``torch.distributed`` store (default: the default group's).
    """

    def __init__(self, uid: int, tp: Transport, store=None) -> None:
        self.tp = tp
        self.store = store if store is not None else default_store()
        if self.store is None:
            raise RuntimeError("shrink mode needs the rendezvous store of torch.distributed's default group")
        self.prefix = f"flexep/{uid}/shrink/"
        self.mask = torch.zeros(tp.world, dtype=torch.int32)
        self.number = 0

    def _key(self, number: int, src: int, dst: int) -> str:
        return f"{self.prefix}{number}/{src}/{dst}"

    def masked(self, peer: int) -> bool:
        return bool(self.mask[peer])

    def start(self, phase: str, send: torch.Tensor, recv: torch.Tensor,
              empty: Callable[[torch.Tensor], None]) -> Posted:
        """Store this rank's block for every unmasked peer (``send``/``recv``: ``[W*Q, ...]``)."""
        tp, world, me = self.tp, self.tp.world, self.tp.rank
        self.number += 1
        sends, recvs = send.view(world, -1, *send.shape[1:]), recv.view(world, -1, *recv.shape[1:])
        for peer in range(world):
            if peer == me:
                recvs[me].copy_(sends[me])
                tp.stats.record("local", sends[me].numel() * sends[me].element_size(), True)
            elif not self.masked(peer):
                data = _to_bytes(sends[peer])
                self.store.set(self._key(self.number, me, peer), data)
                tp.stats.record(tp.topo.link_class(me, peer), len(data), True)
        return Posted(phase, self.number, recv, empty)

    def wait(self, posted: Posted) -> None:
        """Read every unmasked peer's block, masking the ones silent past the deadline."""
        if posted.done:
            return
        tp, world, me = self.tp, self.tp.world, self.tp.rank
        recvs = posted.recv.view(world, -1, *posted.recv.shape[1:])
        deadline = time.monotonic() + tp.timeout
        for peer in range(world):
            if peer == me:
                continue
            key = self._key(posted.number, peer, me)
            if self.masked(peer) or not self._arrives(key, deadline):
                self._mask_silent(peer, posted.phase)
                posted.empty(recvs[peer])
                continue
            data = self.store.get(key)
            self.store.delete_key(key)
            recvs[peer].view(-1).view(torch.uint8).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        posted.done = True

    def barrier(self) -> None:
        """DeepEP's shrink barrier: wait for every unmasked peer, masking the silent ones."""
        tp = self.tp
        token = torch.zeros(tp.world, 1, dtype=torch.uint8)
        self.wait(self.start("barrier", token, torch.empty_like(token), lambda block: None))

    def _arrives(self, key: str, deadline: float) -> bool:
        pause = _POLL_MIN
        while True:
            if self.store.check([key]):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(_POLL_MAX, pause * 2)

    def _mask_silent(self, peer: int, phase: str) -> None:
        if self.masked(peer):
            return
        self.mask[peer] = 1
        warnings.warn(f"flexep shrink mode: timeout for {phase} receive, rank {self.tp.rank}, src_rank "
                      f"{peer} (no message within {self.tp.timeout:g} s); rank {peer} is masked",
                      RuntimeWarning, stacklevel=3)

    def update(self, rank: int, mask: bool) -> None:
        self.mask[rank] = int(bool(mask))

    def clear(self) -> None:
        self.mask.zero_()

    @staticmethod
    def fill(value: int) -> Optional[Callable[[torch.Tensor], None]]:
        """An ``empty`` filler writing byte ``value`` into a block (0xFF: rows with ids -1)."""
        return lambda block: block.view(-1).view(torch.uint8).fill_(value)
