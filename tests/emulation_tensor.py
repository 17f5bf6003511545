"""Device tensors for the emulated accelerator: real CPU data behind a ``cuda``/``npu`` device.

A :class:`DeviceTensor` is a wrapper subclass (``torch.Tensor._make_wrapper_subclass``) that
reports an accelerator device (``cuda:0``, ``npu:0``) while its values live in a plain CPU tensor
(``_data``) of the same shape, strides and storage offset. Every aten op on wrappers runs on the
CPU data and re-wraps its outputs on the same device; views stay views (they are views of the
CPU data), in-place ops return their input wrapper.

Before an op runs, :func:`_check_devices` applies real CUDA's device rules, and
:func:`_host_read` recognises the ops that make the host wait for the device. The rules mirror
PyTorch 2.13 on a GPU:

* a plain CPU tensor may join device tensors in an op only as a 0-dim scalar of a pointwise op
  (``x * torch.tensor(2.0)``), as the index of ``x[idx]`` / ``index_put_`` (PyTorch copies it to
  the device), or as one side of a copy (``dev.copy_(cpu)`` is a host-to-device copy,
  ``cpu.copy_(dev)`` a device-to-host copy); anything else raises real CUDA's "Expected all
  tensors to be on the same device" (index_select, gather, scatter, index_add, embedding_bag,
  matmul, cat, binary ops with a non-scalar CPU tensor, out= on the other device ...);
* device tensors on two different devices (``cuda:0`` and ``cuda:1``) meet only in a copy;
* host reads: ``.item()``/``int()``/``float()``/``bool()``, ``.tolist()``, ``.cpu()``/``.to("cpu")``,
  ``cpu.copy_(dev)``, ``torch.equal``, printing, and ops whose output size depends on device values
  (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``bincount``,
  ``repeat_interleave`` without ``output_size``). They are reported to the active
  :class:`HostReads` guards (see :func:`host_reads`), which count them or raise.

Every error names the op, the devices and the innermost caller frames outside torch and this
harness (the library code that made the mistake).

``cuda`` wrappers cannot use PyTorch's C++ indexing on a CPU-only build (it opens a CUDA device
guard), so ``x[...]`` and ``x[...] = v`` on them are re-implemented here with aten ops following
PyTorch's own slicing rules (:func:`_getitem`, :func:`_setitem`); ``npu`` (PrivateUse1) wrappers
use PyTorch's indexing unchanged.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["DeviceTensor", "EmulationError", "DeviceMismatchError", "HostReadError",
           "EmulationLimitError", "HostRead", "HostReads", "host_reads", "caller_frames",
           "format_frames", "is_device_tensor", "current_session", "set_session", "report_upload"]

aten = torch.ops.aten


# ---- the session this process emulates (set by emulation.py) ---------------------------------
_session: Any = None


def current_session() -> Any:
    """The active emulation session (``emulation.Session``), or None."""
    return _session


def set_session(session: Any) -> None:
    global _session
    _session = session


# ---- errors and caller frames ---------------------------------------------------------------
class EmulationError(RuntimeError):
    """A device mistake found by the emulation (subclasses say which kind).

    Each one is also recorded in the active session's ``errors``, so code that catches it
    cannot hide it (see ``emulation.check_clean``).
    """

    def __init__(self, *args) -> None:
        super().__init__(*args)
        session = current_session()
        if session is not None:
            session.errors.append(self)


class DeviceMismatchError(EmulationError):
    """An op mixed tensors of two devices where real CUDA raises."""


class HostReadError(EmulationError):
    """A device-to-host read inside ``host_reads(forbid=True)``."""


class EmulationLimitError(EmulationError):
    """Something real devices do that this emulation cannot imitate (not a library defect)."""


_HERE = os.path.dirname(os.path.abspath(__file__))
_HARNESS_FILES = {os.path.join(_HERE, name) for name in
                  ("emulation.py", "emulation_tensor.py", "emulation_group.py")}
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_PY_LIB = os.path.dirname(os.path.abspath(contextlib.__file__))


def _outside(path: str) -> bool:
    if path.startswith("<"):
        return False
    path = os.path.abspath(path)
    third_party = "site-packages" in path and f"{os.sep}flexep{os.sep}" not in path  # pytest, pluggy
    return not (path in _HARNESS_FILES or path.startswith(_TORCH_DIR) or path.startswith(_PY_LIB)
                or third_party)


def caller_frames(limit: int = 5) -> list[traceback.FrameSummary]:
    """The innermost ``limit`` stack frames outside torch, the standard library and this harness."""
    return [f for f in traceback.extract_stack() if _outside(f.filename)][-limit:]


def format_frames(frames: list[traceback.FrameSummary]) -> str:
    """``path:line in function: code`` lines, innermost last, paths relative to the cwd."""
    if not frames:
        return "    (no caller frame outside torch and the harness)"
    lines = []
    for f in frames:
        path = os.path.relpath(f.filename) if f.filename.startswith(os.getcwd()) else f.filename
        lines.append(f"    {path}:{f.lineno} in {f.name}: {(f.line or '').strip()}")
    return "\n".join(lines)


def _describe(t: torch.Tensor) -> str:
    dtype = str(t.dtype).replace("torch.", "")
    return f"{t.device} {dtype}{list(t.shape)}"


# ---- the wrapper ------------------------------------------------------------------------------
class DeviceTensor(torch.Tensor):
    """A tensor on an emulated accelerator device; ``_data`` holds its values on the CPU.

    Build one with ``DeviceTensor(cpu_data, torch.device("cuda", 0))`` (the data is used, not
    copied) or, inside an emulated session, with ordinary calls (``torch.zeros(..., device=dev)``,
    ``t.to(dev)``).
    """

    _data: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor, device: torch.device, requires_grad: bool = False):
        if isinstance(data, DeviceTensor) or data.device.type != "cpu":
            raise TypeError(f"DeviceTensor holds a plain CPU tensor, got {type(data).__name__} "
                            f"on {data.device}")
        if data.requires_grad:
            data = data.detach()
        r = torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(),
            dtype=data.dtype, layout=data.layout, device=device, requires_grad=requires_grad)
        r._data = data
        return r

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_grad_enabled():
            with torch._C.DisableTorchFunctionSubclass():  # .requires_grad/.device: no recursion
                _refuse_cuda_autograd(func, args, kwargs)
        handler = _METHOD_OVERRIDES.get(func)
        if handler is not None:
            result = handler(*args, **kwargs)
            if result is not NotImplemented:
                return result
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})

    def __repr__(self, *, tensor_contents=None) -> str:  # printing reads the device memory
        _report_read("print", "printing a device tensor (repr/str) copies it to the host", self)
        text = repr(self._data)
        return f"{text[:-1]}, device='{self.device}')" if text.endswith(")") else text

    def __reduce_ex__(self, protocol):
        # torch.save / pickling: like a real device tensor, the bytes are copied to the host and
        # tagged with the device; loading rebuilds a device tensor (see _rebuild).
        _report_read("save", "torch.save / pickling a device tensor copies it to the host", self)
        return _rebuild, (self._data.clone(), str(self.device), self.requires_grad)

    @property
    def data(self):  # noqa: D401 - mirrors Tensor.data
        with torch._C.DisableTorchFunctionSubclass():
            return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        # ``param.data = other`` swaps the tensor's contents (Module.to/_apply uses it).
        if not isinstance(new, DeviceTensor):
            raise EmulationLimitError(f"assigning a {_describe(new)} tensor to .data of a device tensor "
                                      "is not emulated; use .to(device) instead")
        torch._C.TensorBase.data.__set__(self, new)
        self._data = new._data


# Tensor attributes and methods that never record autograd history.
_NO_HISTORY = {"__get__", "__set__", "__delete__", "requires_grad_", "detach", "detach_", "size", "dim",
               "numel", "stride", "storage_offset", "is_contiguous", "data_ptr", "element_size", "__len__",
               "__repr__", "__format__", "__reduce_ex__", "__deepcopy__", "register_hook", "retain_grad",
               "is_floating_point", "is_complex", "get_device", "untyped_storage", "_is_view",
               "tolist", "item", "__bool__", "__int__", "__float__", "__index__", "__hash__"}


def _refuse_cuda_autograd(func, args, kwargs) -> None:
    """Recording autograd history for a ``cuda`` tensor aborts the process on a CPU build (the
    graph asks the missing CUDA device guard for a stream): raise a clear error first."""
    if getattr(func, "__name__", "") in _NO_HISTORY:
        return
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, DeviceTensor) and t.requires_grad and t.device.type == "cuda":
            raise EmulationLimitError(
                f"{getattr(func, '__name__', func)} would record autograd history for an emulated {t.device} "
                "tensor, which a CPU-only build cannot do; run gradient checks with device_type='npu', "
                "forward-only code under torch.no_grad()")


def is_device_tensor(t: Any) -> bool:
    """True for a tensor on an emulated device."""
    return isinstance(t, DeviceTensor)


def _rebuild(data: torch.Tensor, device: str, requires_grad: bool) -> torch.Tensor:
    """Unpickle a device tensor: on the device inside an emulated session, else fail like CUDA."""
    dev = torch.device(device)
    session = current_session()
    if session is None or dev.type not in session.device_types:
        raise RuntimeError(
            f"Attempting to deserialize object on a {dev.type.upper()} device but no {dev.type} device "
            f"is available (this process does not emulate {dev.type}). If you are running on a "
            "CPU-only machine, please use torch.load with map_location=torch.device('cpu') to map "
            "your storages to the CPU; a library that writes portable files saves .cpu() copies.")
    out = DeviceTensor(data, session.resolve(dev))
    return out.requires_grad_(requires_grad) if requires_grad else out


# ---- host reads --------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostRead:
    """One device-to-host read: its kind, what did it, and the caller frames."""

    kind: str
    what: str
    tensor: str
    frames: tuple

    def __str__(self) -> str:
        return f"{self.kind}: {self.what} ({self.tensor})\n{format_frames(list(self.frames))}"


@dataclass
class HostReads:
    """What a :func:`host_reads` block saw: device-to-host reads and host-to-device copies."""

    forbid: bool = False
    reads: list = field(default_factory=list)
    uploads: list = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.reads)

    def by_kind(self) -> dict:
        out: dict = {}
        for r in self.reads:
            out[r.kind] = out.get(r.kind, 0) + 1
        return out

    def report(self) -> str:
        """Every read with its caller frames (for failure messages)."""
        if not self.reads:
            return "no host reads"
        return f"{self.count} host read(s):\n" + "\n".join(f"  [{i}] {r}" for i, r in enumerate(self.reads))


_guards: list = []  # process-wide: an autograd backward runs on another thread


def _active() -> list:
    return _guards


@contextlib.contextmanager
def host_reads(forbid: bool = False) -> Iterator[HostReads]:
    """Count (or with ``forbid=True`` refuse) device-to-host reads made in this process.

    A forbidden read raises :class:`HostReadError` at the op; if the code under test swallows
    that exception, the block raises it again on exit, so a read can never pass unnoticed.
    """
    log = HostReads(forbid=forbid)
    _active().append(log)
    try:
        yield log
    finally:
        _active().remove(log)
    if forbid and log.reads:
        raise HostReadError(f"host reads inside host_reads(forbid=True) (one was raised and caught):\n"
                            f"{log.report()}")


def _report_read(kind: str, what: str, t: torch.Tensor) -> None:
    guards = _active()
    if not guards:
        return
    read = HostRead(kind, what, _describe(t), tuple(caller_frames()))
    for g in guards:
        g.reads.append(read)
    if any(g.forbid for g in guards):
        raise HostReadError(f"device-to-host read where none is allowed: {read}")


def report_upload(what: str, t: torch.Tensor) -> None:
    """Record a host-to-device copy (allowed; counted for the reports)."""
    for g in _active():
        g.uploads.append(HostRead("h2d", what, _describe(t), tuple(caller_frames(2))))


# ---- device rules ------------------------------------------------------------------------------
_TRANSFERS = {aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default}
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
             aten._index_put_impl_.default, aten._unsafe_index.Tensor, aten._unsafe_index_put.default}
# Not tagged pointwise, but TensorIterator ops on CUDA that take a CPU scalar tensor.
# index_put moves a 0-dim CPU value to the device itself.
_SCALAR_OK = {aten.fill_.Tensor, aten.fill.Tensor, aten.masked_fill.Tensor, aten.masked_fill_.Tensor,
              aten.floor_divide.default, aten.floor_divide_.Tensor, aten.index_put_.default,
              aten.index_put.default, aten._index_put_impl_.default, aten._unsafe_index_put.default}
_DATA_DEPENDENT = {aten.nonzero.default, aten.nonzero_numpy.default, aten.masked_select.default,
                   aten.unique_consecutive.default, aten._unique.default, aten._unique2.default,
                   aten.unique_dim.default, aten.unique_dim_consecutive.default, aten.bincount.default}


def _scalar_ok(func) -> bool:
    """Does CUDA accept a 0-dim CPU tensor in ``func`` (a pointwise TensorIterator op)?"""
    if func in _SCALAR_OK or torch.Tag.pointwise in func.tags:
        return True
    name = func._schema.name.split("::")[-1]
    base = getattr(aten, name.rstrip("_"), None)  # add_ -> add, for in-place variants
    overload = func._overloadname if func._overloadname != "out" else "Tensor"
    op = getattr(base, overload, None) if base is not None else None
    return op is not None and torch.Tag.pointwise in op.tags


def _bind(func, args, kwargs) -> list:
    """``[(schema argument, value)]`` for the arguments actually passed."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.kwarg_only or i >= len(args):
            if arg.name in kwargs:
                out.append((arg, kwargs[arg.name]))
        else:
            out.append((arg, args[i]))
    return out


def _tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _written(arg) -> bool:
    return arg.alias_info is not None and arg.alias_info.is_write


def _mismatch(func, a: str, b: str, detail: str) -> DeviceMismatchError:
    return DeviceMismatchError(
        f"Expected all tensors to be on the same device, but found at least two devices, {a} and {b}! "
        f"(emulated device, {func}): {detail}\n  library frames (innermost last):\n"
        f"{format_frames(caller_frames())}")


def _check_devices(func, bound) -> Optional[torch.device]:
    """Raise where real CUDA raises; return the device the op runs on (None: no device tensor)."""
    devices, plain = {}, []
    for arg, value in bound:
        for t in _tensors(value):
            if isinstance(t, DeviceTensor):
                devices.setdefault(t.device, (arg.name, t))
            elif t.device.type == "cpu":
                plain.append((arg, t))
    if not devices:
        return None
    if func in _TRANSFERS:
        return None  # copies between any two devices are allowed
    if len(devices) > 1:
        (d1, (n1, t1)), (d2, (n2, t2)) = list(devices.items())[:2]
        raise _mismatch(func, str(d1), str(d2), f"argument '{n1}' is {_describe(t1)}, argument '{n2}' "
                        f"is {_describe(t2)}; only copies (copy_, .to) move data between devices")
    dev, (dname, dtensor) = next(iter(devices.items()))
    for arg, t in plain:
        if func in _INDEXING and arg.name == "indices":
            continue  # x[cpu_idx] and index_put_ copy CPU indices to the device
        if t.dim() == 0 and not _written(arg) and _scalar_ok(func):
            continue  # a CPU scalar in a pointwise op
        why = ("it is written by the op (out= / in-place) while the inputs are on the device"
               if _written(arg) else
               "CUDA accepts CPU tensors only as 0-dim scalars of pointwise ops and as indices of "
               "x[idx] / index_put_")
        raise _mismatch(func, str(dev), "cpu", f"argument '{arg.name}' is a {_describe(t)} tensor next "
                        f"to argument '{dname}' ({_describe(dtensor)}); {why}")
    return dev


def _host_read(func, bound, kwargs) -> None:
    """Report the op to the host-read guards if it makes the host wait for device values."""
    values = {arg.name: value for arg, value in bound}
    first = next((t for _, v in bound for t in _tensors(v) if isinstance(t, DeviceTensor)), None)
    if first is None:
        return
    name = str(func)
    if func is aten._local_scalar_dense.default:
        _report_read("item", "Tensor.item() / int() / float() / bool() / .tolist() element", first)
    elif func in (aten.equal.default, aten.is_nonzero.default, aten.is_same_size.default):
        if func is not aten.is_same_size.default:
            _report_read("item", f"{name} returns a Python value computed from device data", first)
    elif func in _DATA_DEPENDENT:
        _report_read("sync", f"{name}: its output size depends on device values", first)
    elif func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor) \
            and values.get("output_size") is None:
        _report_read("sync", f"{name} without output_size: its output size depends on device values", first)
    elif func in _INDEXING:
        masks = [t for t in _tensors(values.get("indices", [])) if isinstance(t, DeviceTensor)
                 and t.dtype in (torch.bool, torch.uint8)]
        if masks:
            _report_read("sync", f"boolean-mask indexing ({name}) with a device mask: runs nonzero", masks[0])
    elif func is aten._to_copy.default:
        dev = values.get("device")
        if dev is not None and torch.device(dev).type == "cpu":
            _report_read("d2h", "device-to-host copy (.cpu() / .to('cpu') / .tolist())", first)
    elif func in _TRANSFERS:
        dst, src = bound[0][1], bound[1][1]
        if isinstance(src, DeviceTensor) and not isinstance(dst, DeviceTensor):
            _report_read("d2h", "device-to-host copy (cpu_tensor.copy_(device_tensor))", src)
        elif isinstance(dst, DeviceTensor) and not isinstance(src, DeviceTensor):
            report_upload("host-to-device copy (device_tensor.copy_(cpu_tensor))", src)


# ---- dispatch ----------------------------------------------------------------------------------
def _unwrap(t):
    return t._data if isinstance(t, DeviceTensor) else t


def _dispatch(func, args, kwargs):
    bound = _bind(func, args, kwargs)
    dev = _check_devices(func, bound)
    _host_read(func, bound, kwargs)
    target = dev
    u_kwargs = tree_map(_unwrap, kwargs)
    if "device" in kwargs and kwargs["device"] is not None:  # factories on a device tensor
        requested = torch.device(kwargs["device"])
        target = None if requested.type == "cpu" else _resolve(requested)
        u_kwargs["device"] = torch.device("cpu")
    elif func in _TRANSFERS:
        target = bound[0][1].device if isinstance(bound[0][1], DeviceTensor) else None
    out = func(*tree_map(_unwrap, args), **u_kwargs)
    _check_metadata(func, bound)
    if target is not None:
        out = tree_map(lambda t: DeviceTensor(t, target) if type(t) is torch.Tensor else t, out)
    return return_and_correct_aliasing(func, args, kwargs, out)


def _resolve(device: torch.device) -> torch.device:
    session = current_session()
    return session.resolve(device) if session is not None else device


def _check_metadata(func, bound) -> None:
    """A written wrapper whose CPU data changed shape (out= resize, resize_, set_) cannot follow."""
    for arg, value in bound:
        if isinstance(value, DeviceTensor) and _written(arg):
            d = value._data
            if torch.Tag.inplace_view in func.tags:
                continue  # return_and_correct_aliasing updates the wrapper's metadata
            if (d.shape, d.stride(), d.storage_offset()) != (value.shape, value.stride(),
                                                           value.storage_offset()):
                raise EmulationLimitError(
                    f"{func} resized device tensor argument '{arg.name}' from {list(value.shape)} to "
                    f"{list(d.shape)}: resizing a device tensor in place (out= of the wrong size, "
                    "resize_, set_) is not emulated; allocate the output at its final size\n"
                    f"  library frames (innermost last):\n{format_frames(caller_frames())}")


# ---- Python-level methods that need help on emulated devices ---------------------------------
def _tolist(self):
    _report_read("d2h", "Tensor.tolist() copies the tensor to the host", self)
    return self._data.tolist()


def _needs_python_indexing(t) -> bool:
    return isinstance(t, DeviceTensor) and t.device.type == "cuda"


def _getitem_override(self, index):
    if not _needs_python_indexing(self):
        return NotImplemented
    return _getitem(self, index)


def _setitem_override(self, index, value):
    if not _needs_python_indexing(self):
        return NotImplemented
    _setitem(self, index, value)
    return None


def _is_int_index(i) -> bool:
    return isinstance(i, int) and not isinstance(i, bool)


def _as_index_tensor(item):
    if isinstance(item, torch.Tensor):
        return item
    return torch.tensor(item)  # a (nested) list: a CPU index tensor, as PyTorch builds it


def _as_tuple(index) -> tuple:
    """PyTorch's ``treatSequenceAsTuple``: a short list holding a sequence, slice, tensor, None or
    Ellipsis is a tuple of indices; any other list is one index."""
    if isinstance(index, tuple):
        return index
    if isinstance(index, list) and len(index) < 32 and any(
            isinstance(i, (list, tuple, slice, torch.Tensor)) or i is None or i is Ellipsis for i in index):
        return tuple(index)
    return (index,)


def _slicing(self, index) -> tuple[torch.Tensor, list, bool]:
    """PyTorch's ``applySlicing``: the basic-indexed view and the advanced index list."""
    index = _as_tuple(index)
    consumed = 0
    for item in index:
        if isinstance(item, torch.Tensor) and item.dtype in (torch.bool, torch.uint8) and item.dim() > 0:
            consumed += item.dim()
        elif item is None or item is Ellipsis or isinstance(item, bool):
            continue
        else:
            consumed += 1
    result, dim, indices, advanced = self, 0, [], False
    for item in index:
        if isinstance(item, torch.Tensor) and item.dim() == 0 and not item.dtype.is_floating_point:
            if item.dtype in (torch.bool, torch.uint8):
                item = bool(item.item())  # a 0-dim mask: PyTorch reads it on the host too
            else:
                item = int(item.item())  # a 0-dim index: PyTorch selects with tensor.item()
        if item is None:
            result = aten.unsqueeze.default(result, dim)
            indices.append(None)
            dim += 1
        elif item is Ellipsis:
            skip = self.dim() - consumed
            indices.extend([None] * skip)
            dim += skip
        elif isinstance(item, bool):
            result = aten.unsqueeze.default(result, dim)
            indices.append(torch.zeros(1 if item else 0, dtype=torch.int64))
            advanced = True
            dim += 1
        elif _is_int_index(item):
            result = aten.select.int(result, dim, item)
        elif isinstance(item, slice):
            step = 1 if item.step is None else item.step
            if step <= 0:
                raise ValueError("step must be greater than zero")
            result = aten.slice.Tensor(result, dim, item.start, item.stop, step)
            indices.append(None)
            dim += 1
        elif isinstance(item, (torch.Tensor, list)):
            t = _as_index_tensor(item)
            indices.append(t)
            advanced = True
            dim += t.dim() if t.dtype in (torch.bool, torch.uint8) else 1
        else:
            raise TypeError(f"emulated indexing: unsupported index {item!r}")
    while indices and indices[-1] is None:
        indices.pop()
    return result, indices, advanced


def _getitem(self, index):
    result, indices, advanced = _slicing(self, index)
    if advanced:
        return aten.index.Tensor(result, indices)
    return aten.alias.default(result) if result is self else result


def _setitem(self, index, value):
    result, indices, advanced = _slicing(self, index)
    if advanced:
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(value, dtype=self.dtype)
        aten.index_put_.default(result, indices, value)
    elif isinstance(value, torch.Tensor):
        value = value.squeeze(0) if value.dim() > result.dim() and value.size(0) == 1 else value
        aten.copy_.default(result, value)
    else:
        aten.fill_.Scalar(result, value)


def _cuda_only(fn):
    """A replacement for a C++ method that opens a CUDA device guard (absent on a CPU build)."""
    def method(self, *args, **kwargs):
        if not _needs_python_indexing(self):
            return NotImplemented
        return fn(self, *args, **kwargs)

    return method


def _contiguous(self, memory_format=torch.contiguous_format):
    if self.is_contiguous(memory_format=memory_format):
        return self
    return aten.clone.default(self, memory_format=memory_format)


def _scalar(self):
    if self.numel() != 1:
        raise ValueError("only one element tensors can be converted to Python scalars")
    return aten._local_scalar_dense.default(self)


def _nonzero(self, *, as_tuple=False):
    return aten.nonzero_numpy.default(self) if as_tuple else aten.nonzero.default(self)


_METHOD_OVERRIDES = {
    torch.Tensor.tolist: _tolist,
    torch.Tensor.__getitem__: _getitem_override,
    torch.Tensor.__setitem__: _setitem_override,
    torch.Tensor.contiguous: _cuda_only(_contiguous),
    torch.Tensor.copy_: _cuda_only(lambda self, other, non_blocking=False:
                                   aten.copy_.default(self, other, non_blocking)),
    torch.Tensor.__int__: _cuda_only(lambda self: int(_scalar(self))),
    torch.Tensor.__index__: _cuda_only(lambda self: int(_scalar(self))),
    torch.Tensor.__float__: _cuda_only(lambda self: float(_scalar(self))),
    torch.Tensor.__invert__: _cuda_only(lambda self: aten.bitwise_not.default(self)),
    torch.Tensor.nonzero: _cuda_only(_nonzero),
    torch.nonzero: _cuda_only(_nonzero),
}
