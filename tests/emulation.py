"""Emulated accelerator test harness: run device code on a CPU-only PyTorch build and catch its
device mistakes.

flexep must run on ``cuda`` (NCCL), ``npu`` (HCCL) and ``xpu`` (XCCL) tensors, but this machine
has no accelerator. This harness makes one up, strictly enough that code which would fail on a
GPU fails here, and says where:

* **Device tensors** (:mod:`emulation_tensor`): :class:`DeviceTensor` reports ``cuda:N`` or
  ``npu:0`` and keeps its values in a CPU tensor. Ops follow real CUDA's device rules (mixing a
  non-scalar CPU tensor with device tensors raises "Expected all tensors to be on the same
  device", except where CUDA allows it: 0-dim CPU scalars in pointwise ops, CPU indices of
  ``x[idx]``/``index_put_``, copies), and device-to-host reads are reported to
  :func:`host_reads` guards.
* **Factories** (:class:`DeviceMode`, a ``TorchFunctionMode`` active in each worker):
  ``torch.empty/zeros/ones/full/arange/tensor/..._like(..., device=dev)``, ``new_*``,
  ``t.to(dev)``, ``t.cuda()``/``t.npu()`` and ``Module.to(dev)`` produce device tensors. For
  ``npu`` the factories are also registered as PrivateUse1 kernels, so allocations inside an
  autograd backward (which runs on the engine's device thread, outside the mode) work as well.
* **An NCCL-like group** (:mod:`emulation_group`): backend ``"emul"``; the default group of every
  worker, so the EP group a test hands to ``Buffer`` is accelerator-only, like the NCCL group
  Megatron, vLLM or SGLang pass. It refuses CPU tensors with NCCL's own message.
* **Host-read guard** (:func:`host_reads`): counts, or forbids, ``.item()``, ``.tolist()``,
  ``.cpu()``, ``bool()``, ``torch.equal``, printing, ``nonzero``, boolean-mask indexing,
  ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``, D2H copies, and the
  emulated device module's ``synchronize()``.
* **A runner** (:func:`run_emulated`) on :func:`flexep.launch.run_local`: spawned ranks, each
  with the emulation set up; every join has a deadline.

Streams and events, by device type:

* ``cuda``: ``torch.cuda.is_available()`` stays False (this is a CPU build) and every
  ``torch.cuda`` runtime call (streams, events, ``synchronize``, ``current_device``) raises
  "Torch not compiled with CUDA enabled". The contract this checks: code holding a ``cuda``
  tensor must not *need* the CUDA runtime; it resolves its device module from the tensor and
  treats a device whose module reports unavailable as synchronous. Hard-coded ``torch.cuda``
  calls on a device path fail here, as they would on an NPU.
* ``npu``: ``torch.npu`` is a synchronous device module that reports itself available, with
  ``Stream``/``Event``/``current_stream``/``synchronize`` (all complete at once; ``synchronize``
  and ``Event.synchronize`` count as host syncs). This checks the path that does use streams.

Known limits: execution is synchronous (no stream races, no CUDA graphs, no caching-allocator
reuse bugs); CPU kernels decide numerics (bf16 rounding may differ from a GPU); Gloo's dtype
rules replace NCCL's; autograd backward works only for ``npu`` tensors (``cuda`` backward needs
a CUDA device guard the CPU build lacks; the harness raises :class:`EmulationLimitError` instead
of letting the engine crash); resizing a device tensor in place (``out=`` of the wrong size,
``resize_``) is not emulated; ``torch.set_default_device``, CUDA generators and pinned memory are
not emulated. A real accelerator run remains the only proof of speed and stream correctness.
"""

from __future__ import annotations

import contextlib
import datetime
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import emulation_group
import emulation_tensor as et
import torch
import torch.distributed as dist
from emulation_tensor import (
    DeviceMismatchError,
    DeviceTensor,
    EmulationError,
    EmulationLimitError,
    HostReadError,
    HostReads,
    host_reads,
    is_device_tensor,
)
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["DeviceTensor", "DeviceMode", "Session", "emulate", "worker_session", "run_emulated",
           "host_reads", "HostReads", "expected_errors", "sync_point", "is_device_tensor",
           "EmulationError", "DeviceMismatchError", "HostReadError", "EmulationLimitError",
           "NotOnDeviceError", "BACKEND"]

NotOnDeviceError = emulation_group.NotOnDeviceError
BACKEND = emulation_group.BACKEND
EMULATED_TYPES = ("cuda", "npu")


# ---- the session ---------------------------------------------------------------------------------
@dataclass
class Session:
    """What this process emulates.

    ``device_types``: emulated types (the first is the primary one, e.g. ``("cuda", "npu")``).
    ``index``/``count``: per type, this process's current device index and the devices it sees
    (``cuda:local_rank`` of ``devices_per_node`` like a multi-GPU node; ``npu:0`` of one, like a
    process that sees one NPU). ``errors``: every :class:`EmulationError` raised since the last
    check, including ones the code under test caught.
    """

    device_types: tuple
    index: dict
    count: dict
    errors: list = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        """This rank's device of the primary type."""
        return self.resolve(torch.device(self.device_types[0]))

    def resolve(self, device) -> torch.device:
        """``cuda`` -> ``cuda:<current>``; an index out of range raises like CUDA."""
        if isinstance(device, int):
            device = torch.device(self.device_types[0], device)
        dev = torch.device(device)
        if dev.type not in self.device_types:
            return dev
        index = self.index[dev.type] if dev.index is None else dev.index
        if not 0 <= index < self.count[dev.type]:
            raise RuntimeError(f"{dev.type.upper()} error: invalid device ordinal ({dev}; this process "
                               f"sees {self.count[dev.type]} {dev.type} device(s))")
        return torch.device(dev.type, index)

    def emulates(self, device) -> bool:
        if device is None:
            return False
        if isinstance(device, int):
            return True
        return torch.device(device).type in self.device_types


@contextlib.contextmanager
def expected_errors() -> Iterator[None]:
    """Errors raised inside this block are the test's intent: forget them (see ``Session.errors``)."""
    session = et.current_session()
    start = len(session.errors) if session else 0
    try:
        yield
    finally:
        if session is not None:
            del session.errors[start:]


# ---- the mode: factories and transfers -----------------------------------------------------------
_NEW_METHODS = {torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones,
                torch.Tensor.new_full, torch.Tensor.new_tensor, torch.Tensor.new_empty_strided}
_FROM_HOST_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}


class DeviceMode(TorchFunctionMode):
    """Routes calls that name an emulated device to CPU work wrapped as device tensors."""

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.to, torch.Tensor.cuda) or getattr(func, "__name__", "") == "npu":
            result = self._to(func, args, kwargs)
            if result is not NotImplemented:
                return result
        elif func in _NEW_METHODS and (is_device_tensor(args[0])
                                       or self.session.emulates(kwargs.get("device"))):
            return self._new(func, args, kwargs)
        elif func is torch.Tensor.data.__set__ and is_device_tensor(args[1]) \
                and not is_device_tensor(args[0]):
            raise EmulationLimitError("host_tensor.data = device_tensor is not emulated (it would leave a "
                                      "host tensor claiming the device); use .to(device) and keep the result")
        elif func is torch.Tensor.pin_memory:
            return args[0]  # pinned host memory is a CUDA runtime feature: emulated as a no-op
        elif self.session.emulates(kwargs.get("device")):
            return self._factory(func, args, kwargs)
        return func(*args, **kwargs)

    def _factory(self, func, args, kwargs):
        target = self.session.resolve(kwargs["device"])
        if func in (torch.as_tensor, torch.asarray) and is_device_tensor(args[0]) \
                and args[0].device == target:
            kwargs.pop("device")
            return func(*args, **kwargs)
        requires_grad = kwargs.pop("requires_grad", False)
        kwargs["device"] = "cpu"
        out = func(*args, **kwargs)
        if func in _FROM_HOST_DATA:
            et.report_upload(f"{getattr(func, '__name__', func)}(host data, device={target})", out)
        return _wrap_all(out, target, requires_grad)

    def _new(self, func, args, kwargs):
        self_ = args[0]
        target = self.session.resolve(kwargs.pop("device", None) or self_.device)
        requires_grad = kwargs.pop("requires_grad", False)
        if target.type == "cpu":
            kwargs["device"] = "cpu"
            return func(*args, **kwargs)
        kwargs["device"] = "cpu"
        base = self_._data if is_device_tensor(self_) else self_
        out = func(base, *args[1:], **kwargs)
        if func is torch.Tensor.new_tensor:
            et.report_upload(f"new_tensor(host data, device={target})", out)
        return _wrap_all(out, target, requires_grad)

    def _to(self, func, args, kwargs):
        self_ = args[0]
        copy = bool(kwargs.pop("copy", False))
        if func is torch.Tensor.cuda:
            dev = args[1] if len(args) > 1 else kwargs.get("device")
            target = torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev or "cuda")
            dtype, fmt = None, kwargs.get("memory_format")
            non_blocking = bool(kwargs.get("non_blocking", False))
        elif func is torch.Tensor.to:
            if len(args) > 1 and isinstance(args[1], torch.Tensor):  # t.to(other)
                target, dtype = args[1].device, args[1].dtype
                non_blocking, fmt = bool(kwargs.get("non_blocking", False)), kwargs.get("memory_format")
            else:
                target, dtype, non_blocking, fmt = torch._C._nn._parse_to(*args[1:], **kwargs)
        else:  # the generated Tensor.npu(): it calls .to(), which comes back here
            return NotImplemented
        if target is None or not self.session.emulates(target):
            if copy:
                kwargs["copy"] = True
            return func(*args, **kwargs)
        target = self.session.resolve(target)
        if target.type == "cuda" and self_.requires_grad and torch.is_grad_enabled():
            et._refuse_cuda_autograd(func, (DeviceTensor(torch.empty(0), target).requires_grad_(),), {})
        if is_device_tensor(self_) and self_.device == target:
            return self_.to(dtype=dtype or self_.dtype, memory_format=fmt or torch.preserve_format,
                            non_blocking=non_blocking, copy=copy)
        return _ToDevice.apply(self_, target, dtype or self_.dtype, fmt or torch.preserve_format)


class _ToDevice(torch.autograd.Function):
    """``t.to(device)`` from the host or another device: a copy, differentiable like the real one."""

    @staticmethod
    def forward(ctx, x, target, dtype, memory_format):
        ctx.source, ctx.dtype = x.device, x.dtype
        if is_device_tensor(x):
            data = x._data.to(dtype=dtype, memory_format=memory_format, copy=True)
        else:
            et.report_upload(f".to({target}) of a host tensor", x)
            data = x.detach().to(dtype=dtype, memory_format=memory_format, copy=True)
        return DeviceTensor(data, target)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.source, ctx.dtype), None, None, None


def _wrap_all(out, target: torch.device, requires_grad: bool = False):
    if isinstance(out, torch.Tensor) and not is_device_tensor(out):
        wrapped = DeviceTensor(out, target)
        return wrapped.requires_grad_(True) if requires_grad else wrapped
    if isinstance(out, (tuple, list)):
        return type(out)(_wrap_all(o, target) for o in out)
    return out


# ---- npu: PyTorch's PrivateUse1 key renamed, with a synchronous device module -----------------
class _Stream:
    """A stream on a synchronous device: every call completes before it returns."""

    def __init__(self, device=None, priority: int = 0, **_: Any) -> None:
        self.priority = priority

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
        et._report_read("synchronize", "Stream.synchronize() blocks the host", torch.empty(0))


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
        et._report_read("synchronize", "Event.synchronize() blocks the host", torch.empty(0))

    def elapsed_time(self, end) -> float:
        return 0.0


class _NpuModule:
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
        et._report_read("synchronize", "torch.npu.synchronize() blocks the host", torch.empty(0))

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


# Factories as kernels of the device's dispatch key, for allocations the mode never sees: C++
# composites (``torch.where(c, x, 2.0)`` makes a scalar tensor with ``x.options()``) and, for
# npu, an autograd backward (it runs on the engine's device thread, outside the mode). The ones
# that decompose into an ``out=`` resize (arange, randperm, ...) are registered whole.
_FACTORIES = ("empty.memory_format", "empty_strided", "arange", "arange.start", "arange.start_step",
              "linspace", "randperm", "eye", "eye.m", "full", "zeros", "ones", "scalar_tensor")
_npu_library: Optional[torch.library.Library] = None


def _factory_library(key: str) -> torch.library.Library:
    lib = torch.library.Library("aten", "IMPL")
    for name in _FACTORIES:
        packet, _, overload = name.partition(".")
        lib.impl(name, _device_factory(getattr(getattr(torch.ops.aten, packet), overload or "default")), key)
    return lib


def _device_factory(op):
    def kernel(*args, **kwargs):
        target = torch.device(kwargs.get("device"))
        session = et.current_session()
        if session is None:
            raise EmulationLimitError(f"{op} on {target} outside an emulated session")
        kwargs["device"] = torch.device("cpu")
        return DeviceTensor(op(*args, **kwargs), session.resolve(target))

    return kernel


@contextlib.contextmanager
def _npu_accelerator_synchronize() -> Iterator[None]:
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


def _install_npu() -> None:
    """Rename PrivateUse1 to ``npu`` (once per process; PyTorch cannot undo it)."""
    global _npu_library
    if _npu_library is not None:
        return
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    _setup_privateuseone_for_python_backend(rename="npu", backend_module=_NpuModule())
    _npu_library = _factory_library("PrivateUse1")


# ---- cuda backward: refuse clearly instead of crashing the autograd engine ---------------------
@contextlib.contextmanager
def _refuse_cuda_backward() -> Iterator[None]:
    import torch.autograd as autograd
    import torch.autograd.graph as graph

    original = graph._engine_run_backward

    def guarded(t_outputs, *args, **kwargs):
        tensors, _ = tree_flatten((t_outputs, args, kwargs))
        cuda = [t for t in tensors if is_device_tensor(t) and t.device.type == "cuda"]
        if cuda:
            raise EmulationLimitError(
                f"backward through an emulated {cuda[0].device} tensor: the CPU build has no CUDA device "
                "guard for the autograd engine; run gradient checks with device_type='npu'")
        return original(t_outputs, *args, **kwargs)

    autograd._engine_run_backward = graph._engine_run_backward = guarded
    try:
        yield
    finally:
        autograd._engine_run_backward = graph._engine_run_backward = original


@contextlib.contextmanager
def _modules_swap_parameters() -> Iterator[None]:
    """``Module.to(device)`` assigns ``param.data = moved`` when PyTorch deems the two tensor types
    compatible, which would leave a host ``Parameter`` claiming the device with no data behind
    it; make it build new parameters instead (``torch.__future__`` switch, restored on exit)."""
    before = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(before)


# ---- the one CUDA runtime query answered: torch.distributed.broadcast asks for it ---------------
@contextlib.contextmanager
def _answer_cuda_capability(session: Session) -> Iterator[None]:
    original = torch.cuda.get_device_capability

    def capability(device=None):
        if device is None or isinstance(device, int) or torch.device(device).type == "cuda":
            session.resolve(torch.device("cuda") if device is None else device)
            return (9, 0)  # an sm90 device (NCCL moves FP8 natively there)
        return original(device)

    torch.cuda.get_device_capability = capability
    try:
        yield
    finally:
        torch.cuda.get_device_capability = original


# ---- object collectives without NumPy --------------------------------------------------------------
@contextlib.contextmanager
def _object_collectives_without_numpy() -> Iterator[None]:
    """``all_gather_object`` and friends decode bytes with ``tensor.numpy()``; where NumPy is not
    installed, decode them with ``tolist()`` instead (same bytes, same host reads)."""
    import importlib.util
    import io
    import pickle

    c10d = dist.distributed_c10d
    if importlib.util.find_spec("numpy") is not None:
        yield
        return
    original = c10d._tensor_to_object

    def tensor_to_object(tensor, tensor_size, group):
        data = bytes(tensor.cpu().tolist())[: int(tensor_size)]
        return pickle.Unpickler(io.BytesIO(data)).load()

    c10d._tensor_to_object = tensor_to_object
    try:
        yield
    finally:
        c10d._tensor_to_object = original


# ---- sessions ------------------------------------------------------------------------------------
@contextlib.contextmanager
def emulate(device_types: Sequence[str] = ("cuda",), *, index: Optional[dict] = None,
            count: Optional[dict] = None) -> Iterator[Session]:
    """Emulate ``device_types`` in this process (thread) while the block runs.

    ``index``/``count`` per type default to device 0 of 1. ``npu`` renames PyTorch's PrivateUse1
    key for the rest of the process, so use it in spawned workers, not in the test process.
    """
    types = tuple(device_types)
    unknown = [t for t in types if t not in EMULATED_TYPES]
    if unknown or not types:
        raise ValueError(f"device_types must be a non-empty subset of {EMULATED_TYPES}, got {types}")
    if et.current_session() is not None:
        raise RuntimeError("an emulation session is already active in this process")
    session = Session(types, {t: 0 for t in types} | dict(index or {}),
                      {t: 1 for t in types} | dict(count or {}))
    if "npu" in types:
        _install_npu()
    cuda_library = _factory_library("CUDA") if "cuda" in types else None
    et.set_session(session)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(DeviceMode(session))
            stack.enter_context(_refuse_cuda_backward())
            stack.enter_context(_object_collectives_without_numpy())
            stack.enter_context(_modules_swap_parameters())
            stack.enter_context(torch.serialization.safe_globals([et._rebuild]))
            if "npu" in types:
                stack.enter_context(_npu_accelerator_synchronize())
            if "cuda" in types:
                stack.enter_context(_answer_cuda_capability(session))
            yield session
    finally:
        et.set_session(None)
        if cuda_library is not None:
            cuda_library._destroy()


@contextlib.contextmanager
def worker_session(rank: int, world: int, device_types: Sequence[str] = ("cuda",),
                   devices_per_node: Optional[int] = None) -> Iterator[Session]:
    """Turn a :func:`flexep.launch.run_local` worker into an emulated-accelerator rank.

    Replaces the worker's Gloo default group with an ``"emul"`` one over the same rendezvous
    store (so ``dist.group.WORLD`` is accelerator-only and the store stays usable), and emulates
    ``device_types``: ``cuda:<rank % devices_per_node>`` (default: all ranks on one node) and
    ``npu:0``.
    """
    types = tuple(device_types)
    per_node = devices_per_node or world
    store = dist.distributed_c10d._get_default_store()
    timeout = dist.distributed_c10d._get_default_group().options._timeout if hasattr(
        dist.distributed_c10d._get_default_group(), "options") else datetime.timedelta(seconds=120)
    dist.destroy_process_group()
    emulation_group.register_backend(types)
    index = {"cuda": rank % per_node, "npu": 0}
    count = {"cuda": per_node, "npu": 1}
    with emulate(types, index={t: index[t] for t in types}, count={t: count[t] for t in types}) as session:
        dist.init_process_group(BACKEND, store=dist.PrefixStore("emul-world/", store), rank=rank,
                                world_size=world, timeout=timeout)
        yield session


def sync_point(name: str, timeout: float = 60.0) -> None:
    """Wait until every rank of the default group reached ``name`` (through the store, not the
    group, so it works after a failed collective). Raises ``RuntimeError`` after ``timeout``."""
    store = dist.distributed_c10d._get_default_store()
    world = dist.get_world_size()
    if store.add(f"emul-sync/{name}", 1) == world:
        store.set(f"emul-sync/{name}/all", "1")
    try:
        store.wait([f"emul-sync/{name}/all"], datetime.timedelta(seconds=timeout))
    except Exception as exc:  # noqa: BLE001 - the store's timeout error, reworded
        raise RuntimeError(f"ranks did not all reach {name!r} within {timeout:g} s") from exc


def check_clean(session: Session, what: str = "the code under test") -> None:
    """Raise if emulation errors were raised and swallowed since the last check."""
    if session.errors:
        errors, session.errors[:] = list(session.errors), []
        raise EmulationError(f"{what} raised and caught {len(errors)} emulation error(s); the first:\n"
                             f"{errors[0]}")


def _no_device_tensors(out, path: str = "result") -> None:
    tensors, _ = tree_flatten(out)
    for t in tensors:
        if is_device_tensor(t):
            raise EmulationError(f"{path} holds a {t.device} tensor: return explicit .cpu() copies "
                                 "from the worker (outside any host_reads guard)")


def _emulated_worker(rank: int, world: int, fn: Callable, device_types, devices_per_node, args) -> Any:
    with worker_session(rank, world, device_types, devices_per_node) as session:
        try:
            out = fn(rank, world, *args)
        except BaseException:
            if session.errors:  # the first emulation error, if a later one masks it
                print(f"[rank {rank}] first emulation error:\n{session.errors[0]}", flush=True)
            raise
        check_clean(session)
        _no_device_tensors(out)
        return out


def run_emulated(fn: Callable[..., Any], world_size: int, device_type: str = "cuda", args: Sequence = (),
                 *, timeout: float = 120.0, extra_device_types: Sequence[str] = (),
                 devices_per_node: Optional[int] = None, env: Optional[dict] = None) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks with an emulated device.

    Each rank emulates ``device_type`` (plus ``extra_device_types``), its default group is the
    accelerator-only ``"emul"`` group, and ``Session.device`` (``emulation.current_session()``)
    is its device. ``fn`` must be importable and return host data (``.cpu()`` copies). Raises
    :class:`flexep.launch.WorkerError` with the failing rank's traceback; never waits longer
    than ``timeout`` seconds.
    """
    from flexep.launch import run_local

    types = (device_type, *[t for t in extra_device_types if t != device_type])
    return run_local(_emulated_worker, world_size, (fn, types, devices_per_node, tuple(args)),
                     timeout=timeout, env=env)


def current_session() -> Optional[Session]:
    """The session of this process (None outside an emulated worker)."""
    return et.current_session()


def format_exception() -> str:
    """The current exception's traceback (for scenario runners that collect failures)."""
    return traceback.format_exc()
