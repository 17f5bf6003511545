"""``npu`` for the emulated-accelerator harness: PyTorch's PrivateUse1 key, renamed.

:func:`install` (once per process; PyTorch cannot undo it) renames PrivateUse1 to ``npu`` with
PyTorch's Python device guard and hooks, which let the autograd engine run a backward through
``npu`` device tensors (it cannot for ``cuda`` on a CPU-only build). ``torch.npu`` becomes
:class:`NpuModule`: one synchronous device whose streams and events are complete as soon as they
exist; ``synchronize()`` and ``Event.synchronize()`` report a host sync to the host-read guards.

:func:`factory_library` registers factories (``empty``, ``arange``, ``full``...) as kernels of a
device dispatch key, for allocations the harness's ``TorchFunctionMode`` never sees: C++
composites (``torch.where(c, x, 2.0)`` makes a scalar tensor with ``x.options()``) and, for
``npu``, an autograd backward (it runs on the engine's device thread, outside the mode).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from emulation_core import EmulationLimitError, current_session, report_read
from emulation_tensor import DeviceTensor

__all__ = ["install", "factory_library", "accelerator_synchronize", "NpuModule"]


class _Stream(torch.Stream):
    """A stream on a synchronous device: every call completes before it returns.

    A ``torch.Stream`` (of the host, underneath) so that ``Tensor.record_stream`` accepts it.
    """

    def __new__(cls, device=None, priority: int = 0, **_: Any):
        return super().__new__(cls, device="cpu", priority=priority)

    def __init__(self, device=None, priority: int = 0, **_: Any) -> None:
        self._priority = priority

    @property
    def device(self) -> torch.device:
        return torch.device("npu", 0)

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None):
        event = event or _Event()
        event.record(self)
        return event

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        report_read("synchronize", "Stream.synchronize() blocks the host", torch.empty(0))


class _Event:
    def __init__(self, enable_timing: bool = False, blocking: bool = False,
                 interprocess: bool = False) -> None:
        self.recorded = False

    def record(self, stream=None) -> None:
        self.recorded = True

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        report_read("synchronize", "Event.synchronize() blocks the host", torch.empty(0))

    def elapsed_time(self, end) -> float:
        return 0.0


class NpuModule:
    """``torch.npu`` of the emulation: one synchronous device, streams and events that are done."""

    Stream = _Stream
    Event = _Event

    def __init__(self) -> None:
        self._stream = _Stream()

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def _is_in_bad_fork(self) -> bool:
        return False

    def _lazy_init(self) -> None:
        pass

    def device_count(self) -> int:
        return 1

    def current_device(self) -> int:
        return 0

    def set_device(self, device) -> None:
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index != 0:
            raise RuntimeError(f"NPU error: invalid device ordinal {index} (this process sees one npu)")

    def synchronize(self, device=None) -> None:
        report_read("synchronize", "torch.npu.synchronize() blocks the host", torch.empty(0))

    def current_stream(self, device=None) -> _Stream:
        return self._stream

    def default_stream(self, device=None) -> _Stream:
        return self._stream

    def set_stream(self, stream) -> None:
        pass

    def stream(self, stream=None):
        return contextlib.nullcontext(stream)

    def manual_seed(self, seed: int) -> None:
        pass

    def manual_seed_all(self, seed: int) -> None:
        pass

    def get_device_name(self, device=None) -> str:
        return "emulated npu"

    def is_bf16_supported(self) -> bool:
        return True

    def empty_cache(self) -> None:
        pass


# The factories that decompose into an ``out=`` resize (arange, randperm, ...) are registered whole.
_FACTORIES = ("empty.memory_format", "empty_strided", "arange", "arange.start", "arange.start_step",
              "linspace", "randperm", "eye", "eye.m", "full", "zeros", "ones", "scalar_tensor")
_npu_library: Optional[torch.library.Library] = None


def factory_library(key: str) -> torch.library.Library:
    lib = torch.library.Library("aten", "IMPL")
    for name in _FACTORIES:
        packet, _, overload = name.partition(".")
        lib.impl(name, _device_factory(getattr(getattr(torch.ops.aten, packet), overload or "default")), key)
    return lib


def _device_factory(op):
    def kernel(*args, **kwargs):
        target = torch.device(kwargs.get("device"))
        session = current_session()
        if session is None:
            raise EmulationLimitError(f"{op} on {target} outside an emulated session")
        kwargs["device"] = torch.device("cpu")
        return DeviceTensor(op(*args, **kwargs), session.resolve(target))

    return kernel


@contextlib.contextmanager
def accelerator_synchronize() -> Iterator[None]:
    """``torch.accelerator.synchronize()`` reaches PyTorch's dummy PrivateUse1 guard, which cannot
    synchronize; route it to the emulated module (a host sync, reported as such)."""
    original = torch.accelerator.synchronize

    def synchronize(device=None):
        acc = torch.accelerator.current_accelerator()
        if acc is not None and acc.type == "npu":
            return torch.npu.synchronize(device)
        return original(device)

    torch.accelerator.synchronize = synchronize
    try:
        yield
    finally:
        torch.accelerator.synchronize = original


def install() -> None:
    """Rename PrivateUse1 to ``npu`` (once per process; PyTorch cannot undo it)."""
    global _npu_library
    if _npu_library is not None:
        return
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    _setup_privateuseone_for_python_backend(rename="npu", backend_module=NpuModule())
    _npu_library = factory_library("PrivateUse1")
