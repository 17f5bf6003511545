"""An NCCL-like process group for the emulated accelerator: device tensors only, Gloo underneath.

:class:`EmulatedProcessGroup` is a pure-Python ``torch.distributed.ProcessGroup`` registered as
backend ``"emul"`` for the emulated device types (``Backend.register_backend(..., devices=[...])``).
Each group is bound to the session's primary device type when it is created (as NCCL is to
``cuda``, HCCL to ``npu``). Like NCCL it refuses any tensor that is not on this rank's device of
that type, with NCCL's message (``No backend type associated with device type cpu``); accepted
tensors are unwrapped to their CPU data and exchanged on a private Gloo group over the same
store, so the exchange is real and zero-copy (Gloo writes straight into the device tensors'
data). The ``Work`` objects are Gloo's: ``wait(timeout)`` behaves as on Gloo.

What ``torch.distributed`` 2.13 routes to a Python group: ``all_to_all_single``,
``all_gather_single`` (``all_gather_into_tensor``), ``allgather``, ``allreduce``,
``allreduce_coalesced``, ``broadcast``, ``barrier``, ``send``/``recv``/``recv_anysource``
(``isend``/``irecv``/``batch_isend_irecv``), ``reduce``, ``gather``, ``scatter``,
``reduce_scatter``/``reduce_scatter_single``. ``new_group(ranks)`` without a backend builds
another emulated group; ``new_group(backend="gloo")`` still gives a CPU group (a legitimate
control plane next to an NCCL group).

Gloo's dtype rules apply instead of NCCL's (no float8: move FP8 as bytes; no bool reductions).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from emulation_core import EmulationError, caller_frames, current_session, format_frames
from emulation_tensor import DeviceTensor

__all__ = ["EmulatedProcessGroup", "NotOnDeviceError", "BACKEND", "register_backend"]

BACKEND = "emul"


class NotOnDeviceError(EmulationError):
    """A tensor that is not on this rank's device was given to the emulated (NCCL-like) group."""


class EmulatedProcessGroup(dist.ProcessGroup):
    """Accelerator-only collectives (NCCL's contract) over a private Gloo group."""

    def __init__(self, store, rank: int, size: int, timeout: datetime.timedelta) -> None:
        super().__init__(rank, size)
        self._rank, self._size = rank, size
        session = current_session()
        self.device_type = session.primary if session is not None else "cuda"  # bound, like NCCL
        self._gloo = dist.ProcessGroupGloo(dist.PrefixStore("emul-gloo/", store), rank, size, timeout)

    # ---- what torch.distributed asks a group about itself ----------------------------------
    @property
    def _device_types(self) -> list:
        return [torch.device(self.device_type)]

    def getBackendName(self) -> str:  # noqa: N802 - ProcessGroup's name
        return BACKEND

    def __repr__(self) -> str:
        return f"EmulatedProcessGroup(rank={self._rank}, size={self._size})"

    # ---- the device check ------------------------------------------------------------------
    def _inner(self, op: str, tensors) -> list:
        """The CPU data of ``tensors``; raises like NCCL for anything not on this rank's device."""
        out = []
        for t in tensors:
            if not isinstance(t, DeviceTensor) or t.device.type != self.device_type:
                raise NotOnDeviceError(
                    f"No backend type associated with device type {t.device.type} (emulated NCCL-like "
                    f"group '{BACKEND}', {op}): got a {t.device} {str(t.dtype).replace('torch.', '')}"
                    f"{list(t.shape)} tensor; this accelerator group (like NCCL, HCCL, XCCL) only moves "
                    f"{self.device_type} tensors\n  library frames (innermost last):\n"
                    f"{format_frames(caller_frames())}")
            session = current_session()
            mine = session.resolve(torch.device(self.device_type)) if session else t.device
            if t.device != mine:
                raise NotOnDeviceError(
                    f"emulated NCCL-like group ({op}): tensor on {t.device}, but this group's device on "
                    f"this rank is {mine}; a communicator moves tensors of its own device only\n"
                    f"  library frames (innermost last):\n{format_frames(caller_frames())}")
            out.append(t._data)
        return out

    def _inner_lists(self, op: str, lists) -> list:
        return [self._inner(op, ts) for ts in lists]

    # ---- collectives -----------------------------------------------------------------------
    def allreduce(self, tensors, opts=None):
        return self._gloo.allreduce(self._inner("allreduce", tensors), opts or dist.AllreduceOptions())

    def allreduce_coalesced(self, tensors, opts=None):
        ops = dist.AllreduceCoalescedOptions()
        if opts is not None:
            ops.reduceOp, ops.timeout = opts.reduceOp, opts.timeout
        return self._gloo.allreduce_coalesced(self._inner("allreduce_coalesced", tensors), ops)

    def broadcast(self, tensors, opts=None):
        return self._gloo.broadcast(self._inner("broadcast", tensors), opts or dist.BroadcastOptions())

    def reduce(self, tensors, opts=None):
        return self._gloo.reduce(self._inner("reduce", tensors), opts or dist.ReduceOptions())

    def allgather(self, output_lists, inputs, opts=None):
        return self._gloo.allgather(self._inner_lists("allgather", output_lists),
                                    self._inner("allgather", inputs), opts or dist.AllgatherOptions())

    def all_gather_single(self, output, input, opts=None):
        return self._gloo._allgather_base(self._inner("all_gather_into_tensor", [output])[0],
                                          self._inner("all_gather_into_tensor", [input])[0],
                                          opts or dist.AllgatherOptions())

    def allgather_coalesced(self, output_lists, inputs, opts=None):
        return self._gloo.allgather_coalesced(self._inner_lists("allgather_coalesced", output_lists),
                                              self._inner("allgather_coalesced", inputs),
                                              opts or dist.AllgatherOptions())

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        work = None
        for o, i in zip(outputs, inputs):
            work = self.all_gather_single(o, i, opts)
            work.wait()
        return work

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None):
        return self.all_gather_single_coalesced(outputs, inputs, opts)

    def reduce_scatter(self, outputs, input_lists, opts=None):
        return self._gloo.reduce_scatter(self._inner("reduce_scatter", outputs),
                                         self._inner_lists("reduce_scatter", input_lists),
                                         opts or dist.ReduceScatterOptions())

    def reduce_scatter_single(self, output, input, opts=None):
        return self._gloo._reduce_scatter_base(self._inner("reduce_scatter_tensor", [output])[0],
                                               self._inner("reduce_scatter_tensor", [input])[0],
                                               opts or dist.ReduceScatterOptions())

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        out = self._inner("all_to_all_single", [output])[0]
        inp = self._inner("all_to_all_single", [input])[0]
        return self._gloo.alltoall_base(out, inp, list(output_split_sizes), list(input_split_sizes),
                                        opts or dist.AllToAllOptions())

    def alltoall(self, outputs, inputs, opts=None):
        # Gloo has no list all-to-all; post it as point-to-point pairs (what NCCL does too).
        outs, ins = self._inner("all_to_all", outputs), self._inner("all_to_all", inputs)
        works = []
        for peer in range(self._size):
            if peer == self._rank:
                outs[peer].copy_(ins[peer])
                continue
            works.append(self._gloo.send([ins[peer].contiguous()], peer, 0))
            works.append(self._gloo.recv([outs[peer]], peer, 0))
        for w in works[:-1]:
            w.wait()
        return works[-1] if works else self._gloo.barrier(dist.BarrierOptions())

    def gather(self, output_lists, inputs, opts=None):
        return self._gloo.gather(self._inner_lists("gather", output_lists), self._inner("gather", inputs),
                                 opts or dist.GatherOptions())

    def scatter(self, outputs, input_lists, opts=None):
        return self._gloo.scatter(self._inner("scatter", outputs), self._inner_lists("scatter", input_lists),
                                  opts or dist.ScatterOptions())

    def send(self, tensors, dst: int, tag: int = 0):
        return self._gloo.send(self._inner("send", tensors), dst, tag)

    def recv(self, tensors, src: int, tag: int = 0):
        return self._gloo.recv(self._inner("recv", tensors), src, tag)

    def recv_anysource(self, tensors, tag: int = 0):
        return self._gloo.recv_anysource(self._inner("recv", tensors), tag)

    def barrier(self, opts=None):
        plain = dist.BarrierOptions()
        if opts is not None:
            plain.timeout = opts.timeout
        return self._gloo.barrier(plain)


def _create(store, rank: int, size: int, timeout: datetime.timedelta) -> EmulatedProcessGroup:
    return EmulatedProcessGroup(store, rank, size, timeout)


def register_backend(device_types) -> None:
    """Register backend ``"emul"`` for ``device_types`` (once per process)."""
    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, _create, devices=list(device_types))
