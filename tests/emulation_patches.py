"""Process-wide adjustments an emulated session makes to PyTorch, each undone on exit.

Every one exists because a CPU-only build differs from an accelerator machine in a way that is
not the code under test's business, or because a device contract needs checking:

* :func:`forward_only_cuda_functions`, :func:`refuse_cuda_backward`: recording autograd history
  for a ``cuda`` tensor aborts a CPU-only build (the graph asks the missing CUDA device guard
  for a stream). Custom ``autograd.Function`` calls run without history (as every op does, see
  ``emulation_tensor._cuda_history``) and a backward through ``cuda`` tensors raises.
* :func:`modules_swap_parameters`: ``Module.to(device)`` builds new parameters instead of
  assigning ``param.data`` (which would leave a host ``Parameter`` claiming the device).
* :func:`answer_cuda_capability`: ``torch.distributed.broadcast`` asks
  ``torch.cuda.get_device_capability`` for a ``cuda`` tensor; the emulated device is an sm90.
* :func:`no_cuda_module_on_npu`: while ``npu`` is the device, ``torch.cuda`` runtime calls made
  directly by the library raise :class:`WrongDeviceModuleError`.
* :func:`object_collectives_without_numpy`: ``all_gather_object`` decodes with ``numpy()``;
  where NumPy is not installed, decode the same bytes with ``tolist()``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import pickle
import sys
from typing import Iterator

import emulation_core as core
import emulation_tensor as et
import torch
import torch.distributed as dist
from emulation_core import EmulationLimitError, WrongDeviceModuleError
from emulation_tensor import is_device_tensor
from torch.utils._pytree import tree_flatten

__all__ = ["forward_only_cuda_functions", "refuse_cuda_backward", "modules_swap_parameters",
           "answer_cuda_capability", "no_cuda_module_on_npu", "object_collectives_without_numpy"]


# ---- cuda autograd: forward-only, backward refused (the CPU build has no CUDA device guard) ----
@contextlib.contextmanager
def forward_only_cuda_functions() -> Iterator[None]:
    """A custom ``autograd.Function`` with a ``cuda`` input that requires grad would record history
    for its ``cuda`` outputs, which aborts the process on a CPU build: run it under ``no_grad`` and
    mark its outputs instead (as :mod:`emulation_tensor` does for every op)."""
    function = torch.autograd.Function
    saved = function.__dict__["apply"]  # a classmethod, or a C classmethod_descriptor (torch >= 2.14)

    def apply(cls, *args, **kwargs):
        original = saved.__get__(None, cls)
        if not et.cuda_history_inputs(args, kwargs):
            return original(*args, **kwargs)
        with torch.no_grad():
            return et.mark_requires_grad(original(*args, **kwargs), args)

    function.apply = classmethod(apply)
    try:
        yield
    finally:
        function.apply = saved


# ---- cuda backward: refuse clearly instead of crashing the autograd engine ---------------------
@contextlib.contextmanager
def refuse_cuda_backward() -> Iterator[None]:
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
def modules_swap_parameters() -> Iterator[None]:
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
def answer_cuda_capability(session) -> Iterator[None]:
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


# ---- npu: the library must not ask torch.cuda about it -----------------------------------------
_CUDA_RUNTIME = ("is_available", "is_initialized", "device_count", "current_device", "set_device",
                 "current_stream", "default_stream", "set_stream", "stream", "synchronize",
                 "get_device_capability", "get_device_properties", "get_device_name", "mem_get_info",
                 "memory_allocated", "empty_cache")


def _library_dirs() -> tuple:
    spec = importlib.util.find_spec("flexep")
    return (os.path.dirname(os.path.abspath(spec.origin)) + os.sep,) if spec and spec.origin else ()


@contextlib.contextmanager
def no_cuda_module_on_npu(session) -> Iterator[None]:
    """While ``npu`` is the primary device, a ``torch.cuda`` runtime call made directly from the
    library is hard-coded CUDA on a device-neutral path (on an NPU host it silently finds no CUDA:
    no events, no streams); raise :class:`WrongDeviceModuleError` there. Calls from torch itself,
    the tests and this harness are left alone."""
    library = _library_dirs()
    saved = {name: getattr(torch.cuda, name) for name in _CUDA_RUNTIME if hasattr(torch.cuda, name)}

    def guarded(name, original):
        def call(*args, **kwargs):
            caller = os.path.abspath(sys._getframe(1).f_code.co_filename)
            if session.primary == "npu" and caller.startswith(library):
                raise WrongDeviceModuleError(
                    f"torch.cuda.{name}() called by the library while the device is "
                    f"{session.device}: hard-coded CUDA on a device-neutral path; resolve the device "
                    "module from the tensor (torch.get_device_module(t.device)) or use "
                    "torch.accelerator\n  library frames (innermost last):\n"
                    f"{core.format_frames(core.caller_frames())}")
            return original(*args, **kwargs)

        return call

    for name, original in saved.items():
        setattr(torch.cuda, name, guarded(name, original))
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(torch.cuda, name, original)


# ---- object collectives without NumPy --------------------------------------------------------------
@contextlib.contextmanager
def object_collectives_without_numpy() -> Iterator[None]:
    """``all_gather_object`` and friends decode bytes with ``tensor.numpy()``; where NumPy is not
    installed, decode them with ``tolist()`` instead (same bytes, same host reads)."""
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
