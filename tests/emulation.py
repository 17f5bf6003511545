"""Emulated accelerator test harness: run device code on a CPU-only PyTorch build and catch its
device mistakes.

flexep must run on ``cuda`` (NCCL), ``npu`` (HCCL) and ``xpu`` (XCCL) tensors, but this machine
has no accelerator. This harness makes one up, strictly enough that code which would fail on a
GPU fails here, and says where (the op, the devices, the library frames). Usage::

    from emulation import run_emulated, current_session, host_reads

    def fn(rank, world):                       # module level: it is sent to spawned ranks
        dev = current_session().device         # cuda:<rank> (one node of ``world`` GPUs)
        buf = flexep.Buffer(dist.group.WORLD)  # WORLD is the accelerator-only "emul" group
        with host_reads(forbid=True):          # any device-to-host read raises, with its frame
            out = ...
        return out.cpu()                       # host copies only, outside the guard

    results = run_emulated(fn, world_size=2, device_type="cuda", extra_device_types=("npu",))

The pieces, one module each:

* :mod:`emulation_tensor`: :class:`DeviceTensor` reports ``cuda:N`` or ``npu:0`` and keeps its
  values in a CPU tensor. Ops follow real CUDA's device rules: mixing a non-scalar CPU tensor
  with device tensors raises "Expected all tensors to be on the same device", except where CUDA
  allows it (0-dim CPU scalars in pointwise ops, CPU indices of ``x[idx]``/``index_put_``,
  copies: ``dev.copy_(cpu)`` is a host-to-device copy, ``cpu.copy_(dev)`` and ``.cpu()``
  device-to-host); ``cuda:0`` and ``cuda:1`` meet only in a copy. :mod:`emulation_indexing`
  re-implements the few C++ methods that need a CUDA device guard.
* :mod:`emulation_core`: errors, caller frames, and the host-read guard :func:`host_reads`,
  which counts or forbids ``.item()``, ``int()``/``bool()``, ``.tolist()``, ``.cpu()``, D2H
  copies, ``torch.equal``, printing, ``torch.save``, ``nonzero``, boolean-mask indexing with a
  device mask, ``masked_select``, ``unique``, ``bincount`` (CUDA's reads min and max),
  ``repeat_interleave`` without ``output_size``, and the emulated ``synchronize()``.
* :class:`DeviceMode` (a ``TorchFunctionMode`` active in each worker): factories with
  ``device=`` (``torch.empty/zeros/ones/full/arange/tensor/randn/..._like``), ``new_*``,
  ``t.to(dev)``, ``t.cuda()``/``t.npu()`` and ``Module.to(dev)`` produce device tensors
  (host-to-device copies are counted as uploads, never forbidden).
* :mod:`emulation_npu`: ``npu`` is PyTorch's PrivateUse1 key renamed, with a synchronous
  ``torch.npu`` module; factories are also registered as device kernels (C++ composites, npu
  backward).
* :mod:`emulation_group`: backend ``"emul"``, an NCCL-like Python process group bound to one
  device type, refusing host tensors with NCCL's own message ("No backend type associated with
  device type cpu") and exchanging device data on a private Gloo group. It is the default
  group of every worker, so the EP group a test hands to ``Buffer`` is accelerator-only, like
  the NCCL group Megatron, vLLM or SGLang pass; ``new_group(ranks)`` builds more of them and
  ``new_group(backend="gloo")`` still gives a CPU group (a legitimate control plane).
* :mod:`emulation_patches`: the process-wide adjustments a session makes (and undoes): cuda
  autograd without history, ``Module.to`` building new parameters, the one CUDA query answered,
  ``torch.cuda`` refused to the library on npu, object collectives without NumPy.
* :func:`run_emulated` on :func:`flexep.launch.run_local`: spawned ranks, each set up by
  :func:`worker_session`; every join has a deadline, and an emulation error the code under
  test caught and swallowed still fails the rank (:func:`check_clean`).

Streams, events and autograd, by device type:

* ``cuda``: ``torch.cuda.is_available()`` stays False (this is a CPU build) and ``torch.cuda``
  runtime calls (streams, events, ``synchronize``, ``current_device``) raise "Torch not compiled
  with CUDA enabled". The contract this checks: code holding a ``cuda`` tensor must not *need*
  the CUDA runtime; it resolves its device module from the tensor and treats a device whose
  module reports unavailable as synchronous. One query is answered, because
  ``torch.distributed.broadcast`` itself asks it: ``get_device_capability`` (an sm90 device).
  Autograd on ``cuda`` is forward-only: recording history for a ``cuda`` tensor would abort a
  CPU-only build, so ops run without history and mark their outputs ``requires_grad``; a
  backward through ``cuda`` tensors, or carrying them with history to the host, raises
  :class:`EmulationLimitError`. Gradient checks run on ``npu``.
* ``npu``: ``torch.npu`` reports itself available, with ``Stream``/``Event``/
  ``current_stream``/``synchronize`` that complete at once (``synchronize`` and
  ``Event.synchronize`` count as host syncs); the autograd engine runs backward through
  ``npu`` tensors on its device thread. This checks the path that does use streams. While
  ``npu`` is the device, a ``torch.cuda`` runtime call made directly by the library raises
  :class:`WrongDeviceModuleError`: on an NPU host it would silently find no CUDA (no event, no
  stream), which is hard-coded CUDA on a device-neutral path.

Known limits: execution is synchronous (no stream races, no CUDA graphs, no caching-allocator
reuse bugs, stream ordering of events is not checked); CPU kernels decide numerics (bf16
rounding may differ from a GPU); Gloo's dtype rules replace NCCL's; resizing a device tensor in
place (``out=`` of the wrong size, ``resize_``) raises :class:`EmulationLimitError`;
``Module.to`` builds new ``Parameter`` objects; ``torch.set_default_device``, CUDA generators,
pinned memory (``pin_memory()`` is a no-op), CUDA graphs and ``torch.compile`` are not emulated;
0-dim CPU tensors are accepted in every pointwise op (CUDA accepts them in TensorIterator ops),
a few non-pointwise TensorIterator ops may be refused. A real accelerator run remains the only
proof of speed and stream correctness.
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import emulation_core as core
import emulation_group
import emulation_npu
import emulation_patches as patches
import emulation_tensor as et
import torch
import torch.distributed as dist
import torch.utils.backend_registration
from emulation_core import (
    DeviceMismatchError,
    EmulationError,
    EmulationLimitError,
    HostReadError,
    HostReads,
    WrongDeviceModuleError,
    host_reads,
)
from emulation_tensor import DeviceTensor, is_device_tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["DeviceTensor", "DeviceMode", "Session", "emulate", "worker_session", "run_emulated",
           "host_reads", "HostReads", "expected_errors", "sync_point", "is_device_tensor",
           "EmulationError", "DeviceMismatchError", "HostReadError", "EmulationLimitError",
           "NotOnDeviceError", "WrongDeviceModuleError", "BACKEND", "SUPPORTED", "UNSUPPORTED"]

# The NPU face is torch's Python privateuse1 backend; older torch releases (2.4 among them) lack
# it and index or deserialize differently, so the harness runs on the releases that have it.
SUPPORTED = hasattr(torch.utils.backend_registration, "_setup_privateuseone_for_python_backend")
UNSUPPORTED = (f"the emulated accelerator needs torch's Python privateuse1 backend "
               f"(torch.utils.backend_registration._setup_privateuseone_for_python_backend), which "
               f"torch {torch.__version__} lacks")

NotOnDeviceError = emulation_group.NotOnDeviceError

BACKEND = emulation_group.BACKEND
EMULATED_TYPES = ("cuda", "npu")


# ---- the session ---------------------------------------------------------------------------------
@dataclass
class Session:
    """What this process emulates.

    ``device_types``: emulated types, e.g. ``("cuda", "npu")``. ``primary``: the type groups are
    created for (an ``"emul"`` group is bound to one device type, like NCCL to ``cuda`` and HCCL
    to ``npu``); the first type unless changed with :meth:`use`. ``index``/``count``: per type,
    this process's current device index and the devices it sees (``cuda:local_rank`` of
    ``devices_per_node`` like a multi-GPU node; ``npu:0`` of one, like a process that sees one
    NPU). ``errors``: every :class:`EmulationError` raised since the last check, including ones
    the code under test caught.
    """

    device_types: tuple
    index: dict
    count: dict
    errors: list = field(default_factory=list)
    primary: str = ""

    def __post_init__(self) -> None:
        self.primary = self.primary or self.device_types[0]

    @property
    def device(self) -> torch.device:
        """This rank's device of the primary type."""
        return self.resolve(torch.device(self.primary))

    @contextlib.contextmanager
    def use(self, device_type: str) -> Iterator[torch.device]:
        """Make ``device_type`` primary while the block runs: the groups created in it (also by
        the code under test) are bound to it. Yields this rank's device of that type."""
        if device_type not in self.device_types:
            raise ValueError(f"{device_type!r} is not emulated here ({self.device_types})")
        before, self.primary = self.primary, device_type
        try:
            yield self.device
        finally:
            self.primary = before

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
    session = core.current_session()
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
            core.report_upload(f"{getattr(func, '__name__', func)}(host data, device={target})", out)
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
            core.report_upload(f"new_tensor(host data, device={target})", out)
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
        if is_device_tensor(self_) and self_.device == target:
            return self_.to(dtype=dtype or self_.dtype, memory_format=fmt or torch.preserve_format,
                            non_blocking=non_blocking, copy=copy)
        args = (self_, target, dtype or self_.dtype, fmt or torch.preserve_format)
        if target.type == "cuda" and self_.requires_grad and torch.is_grad_enabled():
            with torch.no_grad():  # forward-only cuda autograd (see emulation_tensor._cuda_history)
                return et.mark_requires_grad(_ToDevice.apply(*args), args)
        return _ToDevice.apply(*args)


class _ToDevice(torch.autograd.Function):
    """``t.to(device)`` from the host or another device: a copy, differentiable like the real one."""

    @staticmethod
    def forward(ctx, x, target, dtype, memory_format):
        ctx.source, ctx.dtype = x.device, x.dtype
        if is_device_tensor(x):
            data = x._data.to(dtype=dtype, memory_format=memory_format, copy=True)
        else:
            core.report_upload(f".to({target}) of a host tensor", x)
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
    if core.current_session() is not None:
        raise RuntimeError("an emulation session is already active in this process")
    session = Session(types, {t: 0 for t in types} | dict(index or {}),
                      {t: 1 for t in types} | dict(count or {}))
    if "npu" in types:
        emulation_npu.install()
    cuda_library = emulation_npu.factory_library("CUDA") if "cuda" in types else None
    core.set_session(session)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(DeviceMode(session))
            stack.enter_context(patches.refuse_cuda_backward())
            stack.enter_context(patches.object_collectives_without_numpy())
            stack.enter_context(patches.modules_swap_parameters())
            stack.enter_context(torch.serialization.safe_globals([et._rebuild]))
            stack.enter_context(et.saved_on_device())
            if "cuda" in types:
                stack.enter_context(patches.forward_only_cuda_functions())
                stack.enter_context(patches.answer_cuda_capability(session))
            if "npu" in types:
                stack.enter_context(emulation_npu.accelerator_synchronize())
                stack.enter_context(patches.no_cuda_module_on_npu(session))
            yield session
    finally:
        core.set_session(None)
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
                 devices_per_node: Optional[int] = None, env: Optional[dict] = None,
                 allow_failures: bool = False) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks with an emulated device.

    Each rank emulates ``device_type`` (plus ``extra_device_types``), its default group is the
    accelerator-only ``"emul"`` group, and ``Session.device`` (``emulation.current_session()``)
    is its device. ``fn`` must be importable and return host data (``.cpu()`` copies). Raises
    :class:`flexep.launch.WorkerError` with the failing rank's traceback (with
    ``allow_failures``, puts it in that rank's slot instead); never waits longer than
    ``timeout`` seconds.
    """
    from flexep.launch import run_local

    types = (device_type, *[t for t in extra_device_types if t != device_type])
    return run_local(_emulated_worker, world_size, (fn, types, devices_per_node, tuple(args)),
                     timeout=timeout, env=env, allow_failures=allow_failures)


def current_session() -> Optional[Session]:
    """The session of this process (None outside an emulated worker)."""
    return core.current_session()
