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

``cuda`` wrappers cannot use PyTorch's C++ indexing (and a few other methods) on a CPU-only
build, which open a CUDA device guard; :mod:`emulation_indexing` re-implements them with aten
ops. ``npu`` (PrivateUse1) wrappers use PyTorch's own.

``cuda`` autograd is forward-only (recording history for a ``cuda`` tensor would abort the
process): see :func:`_cuda_history`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import emulation_indexing as ix
import torch
from emulation_core import (
    DeviceMismatchError,
    EmulationLimitError,
    caller_frames,
    current_session,
    describe,
    format_frames,
    report_read,
    report_upload,
)
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["DeviceTensor", "is_device_tensor", "cuda_history_inputs", "mark_requires_grad", "saved_on_device"]

aten = torch.ops.aten


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
                history = _cuda_history(func, args, kwargs)
            if history:
                with torch.no_grad():
                    return mark_requires_grad(cls.__torch_function__(func, types, args, kwargs), args)
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
        report_read("print", "printing a device tensor (repr/str) copies it to the host", self)
        text = repr(self._data)
        return f"{text[:-1]}, device='{self.device}')" if text.endswith(")") else text

    def __reduce_ex__(self, protocol):
        # torch.save / pickling: like a real device tensor, the bytes are copied to the host and
        # their storage is tagged with the device (see saved_on_device); loading rebuilds a
        # device tensor, or a host one under map_location="cpu" (see _rebuild).
        report_read("save", "torch.save / pickling a device tensor copies it to the host", self)
        data = self._data.clone()
        _saving[_storage_key(data)] = (str(self.device), data)
        return _rebuild, (data, str(self.device), self.requires_grad)

    @property
    def data(self):  # noqa: D401 - mirrors Tensor.data
        with torch._C.DisableTorchFunctionSubclass():
            return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        # ``param.data = other`` swaps the tensor's contents (Module.to/_apply uses it).
        if not isinstance(new, DeviceTensor):
            raise EmulationLimitError(f"assigning a {describe(new)} tensor to .data of a device tensor "
                                      "is not emulated; use .to(device) instead")
        torch._C.TensorBase.data.__set__(self, new)
        self._data = new._data


# Tensor attributes and methods that never record autograd history.
_NO_HISTORY = {"__get__", "__set__", "__delete__", "requires_grad_", "detach", "detach_", "size", "dim",
               "numel", "stride", "storage_offset", "is_contiguous", "data_ptr", "element_size", "__len__",
               "__repr__", "__format__", "__reduce_ex__", "__deepcopy__", "register_hook", "retain_grad",
               "is_floating_point", "is_complex", "get_device", "untyped_storage", "_is_view",
               "tolist", "item", "__bool__", "__int__", "__float__", "__index__", "__hash__"}


def cuda_history_inputs(args, kwargs) -> bool:
    """Would an op on these arguments record autograd history for an emulated ``cuda`` tensor?"""
    if not torch.is_grad_enabled():
        return False
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    return any(t.requires_grad for t in tensors) and any(
        isinstance(t, DeviceTensor) and t.device.type == "cuda" for t in tensors)


def _cuda_history(func, args, kwargs) -> bool:
    """``cuda`` autograd is forward-only here. Recording history for a ``cuda`` tensor aborts the
    process on a CPU build (the graph asks the missing CUDA device guard for a stream), so such
    ops run under ``no_grad`` and their outputs are marked ``requires_grad`` (no history); a
    backward through them is refused (``emulation``), and so is carrying them to the host, where
    the lost history could not be noticed."""
    if getattr(func, "__name__", "") in _NO_HISTORY or not cuda_history_inputs(args, kwargs):
        return False
    to_host = func is torch.Tensor.cpu or (func is torch.Tensor.copy_
                                           and not isinstance(args[0], DeviceTensor))
    if func is torch.Tensor.to:
        target = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        dev = target.device if target is not None else torch._C._nn._parse_to(*args[1:], **kwargs)[0]
        to_host = dev is not None and dev.type == "cpu"
    if to_host:
        raise EmulationLimitError(
            f"{getattr(func, '__name__', func)} would carry autograd history from an emulated cuda tensor "
            "to the host, which a CPU-only build cannot record; run gradient checks with "
            "device_type='npu', or detach() first\n  library frames (innermost last):\n"
            f"{format_frames(caller_frames())}")
    return True


def mark_requires_grad(out, inputs):
    """Outputs of a forward-only ``cuda`` op: floating tensors say ``requires_grad`` like autograd's."""
    keep = {id(t) for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)}
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor) and id(t) not in keep and not t.requires_grad \
                and (t.dtype.is_floating_point or t.dtype.is_complex):
            t.requires_grad_(True)
    return out


def is_device_tensor(t: Any) -> bool:
    """True for a tensor on an emulated device."""
    return isinstance(t, DeviceTensor)


# ---- torch.save / torch.load of device tensors ----------------------------------------------
# A saved device tensor is ``_rebuild(host copy, device)`` whose storage carries the device as its
# location tag, as a real CUDA storage does ("cuda:0"). At load time the location goes through
# torch's deserializers: here (``saved_on_device``) a storage tagged with an emulated device stays
# on the host but is remembered, and ``_rebuild`` turns it into a device tensor; with
# ``map_location="cpu"`` the deserializer is never asked and the tensor stays on the host. Where
# the device is not emulated (a plain process), loading fails as it does without CUDA.
_saving: dict = {}  # storage key -> (device, host copy kept alive until torch.save tags it)
_restored: set = set()  # keys of storages torch.load restored to an emulated device


def _storage_key(t) -> tuple:
    storage = t.untyped_storage() if isinstance(t, torch.Tensor) else t
    return storage.data_ptr(), storage.nbytes()


def _tag(storage) -> Optional[str]:
    entry = _saving.pop(_storage_key(storage), None)
    return entry[0] if entry else None


def _restore(storage, location: str):
    kind = location.split(":")[0]
    session = current_session()
    if session is None or kind not in session.device_types:
        return None  # not emulated here: torch's own deserializer decides (and fails without CUDA)
    _restored.add(_storage_key(storage))
    return storage


@contextlib.contextmanager
def saved_on_device() -> Iterator[None]:
    """Register the tagger and deserializer above with ``torch.serialization`` while active."""
    entry = (-1, _tag, _restore)  # before torch's own "cpu"/"cuda" packages
    torch.serialization._package_registry.insert(0, entry)
    try:
        yield
    finally:
        torch.serialization._package_registry.remove(entry)
        _saving.clear()
        _restored.clear()


def _rebuild(data: torch.Tensor, device: str, requires_grad: bool) -> torch.Tensor:
    """Unpickle a device tensor: on its device if torch.load restored it there, else on the host."""
    out = data
    if _storage_key(data) in _restored:
        out = DeviceTensor(data, current_session().resolve(torch.device(device)))
    return out.requires_grad_(requires_grad) if requires_grad else out


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
                   aten.unique_dim.default, aten.unique_dim_consecutive.default}


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
        raise _mismatch(func, str(d1), str(d2), f"argument '{n1}' is {describe(t1)}, argument '{n2}' "
                        f"is {describe(t2)}; only copies (copy_, .to) move data between devices")
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
        raise _mismatch(func, str(dev), "cpu", f"argument '{arg.name}' is a {describe(t)} tensor next "
                        f"to argument '{dname}' ({describe(dtensor)}); {why}")
    return dev


def _is_masked_fill(func, values: dict) -> bool:
    """``x[mask] = scalar``: CUDA's ``index_put_`` turns one same-device mask and a one-element
    host value into ``masked_fill_`` (``canDispatchToMaskedFill``), which reads nothing back."""
    value, indices, self_ = values.get("values"), values.get("indices") or [], values.get("self")
    defined = [t for t in indices if t is not None]
    return (func is not aten.index.Tensor and not values.get("accumulate", False)
            and isinstance(value, torch.Tensor) and not isinstance(value, DeviceTensor)
            and value.numel() == 1 and len(defined) == 1 and defined[0].device == self_.device)


def _host_read(func, bound, kwargs) -> None:
    """Report the op to the host-read guards if it makes the host wait for device values."""
    values = {arg.name: value for arg, value in bound}
    first = next((t for _, v in bound for t in _tensors(v) if isinstance(t, DeviceTensor)), None)
    if first is None:
        return
    name = str(func)
    if func is aten._local_scalar_dense.default:
        report_read("item", "Tensor.item() / int() / float() / bool() / .tolist() element", first)
    elif func in (aten.equal.default, aten.is_nonzero.default):
        report_read("item", f"{name} returns a Python value computed from device data", first)
    elif func is aten.bincount.default:
        report_read("sync", f"{name}: CUDA's bincount reads the input's min and max on the host "
                    "(even with minlength)", first)
    elif func in _DATA_DEPENDENT:
        report_read("sync", f"{name}: its output size depends on device values", first)
    elif func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor) \
            and values.get("output_size") is None:
        report_read("sync", f"{name} without output_size: its output size depends on device values", first)
    elif func in _INDEXING:
        masks = [t for t in _tensors(values.get("indices", [])) if isinstance(t, DeviceTensor)
                 and t.dtype in (torch.bool, torch.uint8)]
        if masks and not _is_masked_fill(func, values):
            report_read("sync", f"boolean-mask indexing ({name}) with a device mask: runs nonzero", masks[0])
    elif func is aten._to_copy.default:
        dev = values.get("device")
        if dev is not None and torch.device(dev).type == "cpu":
            report_read("d2h", "device-to-host copy (.cpu() / .to('cpu') / .tolist())", first)
    elif func in _TRANSFERS:
        dst, src = bound[0][1], bound[1][1]
        if isinstance(src, DeviceTensor) and not isinstance(dst, DeviceTensor):
            report_read("d2h", "device-to-host copy (cpu_tensor.copy_(device_tensor))", src)
        elif isinstance(dst, DeviceTensor) and not isinstance(src, DeviceTensor):
            report_upload("host-to-device copy (device_tensor.copy_(cpu_tensor))", src)


# ---- dispatch ----------------------------------------------------------------------------------
def _unwrap(t):
    return t._data if isinstance(t, DeviceTensor) else t


def _dispatch(func, args, kwargs):
    if func is torch.ops.aten.record_stream.default:
        # The emulated devices are synchronous: there is no later reuse to protect against.
        return None
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
    report_read("d2h", "Tensor.tolist() copies the tensor to the host", self)
    return self._data.tolist()


def _needs_python_indexing(t) -> bool:
    return isinstance(t, DeviceTensor) and t.device.type == "cuda"


def _getitem_override(self, index):
    if not _needs_python_indexing(self):
        return NotImplemented
    return ix.getitem(self, index)


def _setitem_override(self, index, value):
    if not _needs_python_indexing(self):
        return NotImplemented
    ix.setitem(self, index, value)
    return None


def _cuda_only(fn):
    """A replacement for a C++ method that opens a CUDA device guard (absent on a CPU build)."""
    def method(self, *args, **kwargs):
        if not _needs_python_indexing(self):
            return NotImplemented
        return fn(self, *args, **kwargs)

    return method


_METHOD_OVERRIDES = {
    torch.Tensor.tolist: _tolist,
    # Addresses of the host data: distinct per allocation, equal for views of one storage (the
    # wrapper's own storage has none).
    torch.Tensor.data_ptr: lambda self: self._data.data_ptr(),
    torch.Tensor.__getitem__: _getitem_override,
    torch.Tensor.__setitem__: _setitem_override,
    torch.Tensor.contiguous: _cuda_only(ix.contiguous),
    torch.Tensor.copy_: _cuda_only(lambda self, other, non_blocking=False:
                                   aten.copy_.default(self, other, non_blocking)),
    torch.Tensor.__int__: _cuda_only(lambda self: int(ix.scalar(self))),
    torch.Tensor.__index__: _cuda_only(lambda self: int(ix.scalar(self))),
    torch.Tensor.__float__: _cuda_only(lambda self: float(ix.scalar(self))),
    torch.Tensor.__invert__: _cuda_only(lambda self: aten.bitwise_not.default(self)),
    torch.Tensor.nonzero: _cuda_only(ix.nonzero),
    torch.nonzero: _cuda_only(ix.nonzero),
}
