"""Devices: the runtime module behind a tensor's device, its streams and events, its backend.

flexep never picks a device on its own: every tensor a call creates lives on the device of the
call's input, and the module that drives that device (``torch.cuda``, ``torch.npu`` from
``torch_npu``, ``torch.xpu``) is looked up from the device *type*, never from
``torch.cuda.is_available()``. A device whose module is missing or reports itself unavailable
(CPU, or an emulated device in tests) is treated as synchronous: no streams, no events, every
call has finished when it returns.

| device type | module | collective backend |
|---|---|---|
| ``cuda`` | ``torch.cuda`` | ``nccl`` |
| ``npu`` | ``torch.npu`` (``import torch_npu``) | ``hccl`` |
| ``xpu`` | ``torch.xpu`` | ``xccl`` |
| ``cpu`` | none | ``gloo`` |
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Iterator, Optional

import torch
import torch.distributed as dist

__all__ = ["BACKENDS", "backend_for", "device_of", "device_module", "has_streams", "current_stream",
           "new_stream", "stream_scope", "default_device", "group_devices", "group_carries",
           "setup_group_backend", "data_backend"]

BACKENDS = {"cuda": "nccl", "npu": "hccl", "xpu": "xccl", "cpu": "gloo"}


def backend_for(device_type: str) -> str:
    """The ``torch.distributed`` backend for a device type (``"cuda"`` -> ``"nccl"``, ...)."""
    if device_type not in BACKENDS:
        raise ValueError(f"no known collective backend for device type {device_type!r}; expected one "
                         f"of {sorted(BACKENDS)} (or pass the backend explicitly)")
    return BACKENDS[device_type]


def device_of(x) -> Optional[torch.device]:
    """The device of ``x`` (a tensor, or a tuple whose first item is one), else None."""
    t = x[0] if isinstance(x, (tuple, list)) and x else x
    return t.device if isinstance(t, torch.Tensor) else None


def device_module(device: Optional[torch.device]) -> Optional[ModuleType]:
    """The runtime module of ``device`` if it has usable streams, else ``None`` (CPU included)."""
    if device is None or device.type in ("cpu", "meta"):
        return None
    mod = getattr(torch, device.type, None)
    if mod is None or not hasattr(mod, "Stream") or not hasattr(mod, "current_stream"):
        return None
    try:
        return mod if mod.is_available() else None
    except Exception:  # noqa: BLE001 - a half-registered backend is treated as synchronous
        return None


def has_streams(device: Optional[torch.device]) -> bool:
    """True when work on ``device`` runs asynchronously on streams (real accelerators)."""
    return device_module(device) is not None


def current_stream(device: torch.device):
    """The current stream of ``device``, or ``None`` where there are none."""
    mod = device_module(device)
    return None if mod is None else mod.current_stream(device)


def new_stream(device: torch.device):
    """A new stream on ``device``, or ``None`` where there are none."""
    mod = device_module(device)
    return None if mod is None else mod.Stream(device=device)


@contextlib.contextmanager
def stream_scope(device: torch.device, stream) -> Iterator[None]:
    """Make ``stream`` current on ``device`` inside the block (nothing to do without streams)."""
    mod = device_module(device)
    if mod is None or stream is None:
        yield
        return
    with mod.stream(stream):
        yield


def default_device() -> torch.device:
    """This process's accelerator (``LOCAL_RANK``-th if several), else the CPU: for launchers only.

    The library itself always follows the input tensors; this only picks where a launcher or a
    benchmark creates its inputs.
    """
    import os

    for kind in ("cuda", "npu", "xpu"):
        mod = getattr(torch, kind, None)
        try:
            if mod is not None and mod.is_available() and mod.device_count() > 0:
                index = int(os.environ.get("LOCAL_RANK", "0")) % mod.device_count()
                return torch.device(kind, index)
        except Exception:  # noqa: BLE001 - a broken runtime means: not this one
            continue
    return torch.device("cpu")


def group_devices(group: dist.ProcessGroup) -> set[str]:
    """Device types ``group`` can move tensors of (``{"cuda"}`` for an NCCL-only group)."""
    try:
        return {d.type for d in group._device_types}
    except Exception:  # noqa: BLE001 - older builds: ask for the CPU backend directly
        try:
            group._get_backend(torch.device("cpu"))
            return {"cpu"}
        except Exception:  # noqa: BLE001
            return set()


def group_carries(group: dist.ProcessGroup, device_type: str) -> bool:
    """Whether ``group`` can move tensors of ``device_type``."""
    return device_type in group_devices(group)


def _backends(spec: str) -> set[str]:
    """Backend names in a ``dist.get_backend`` string (``"cpu:gloo,cuda:nccl"`` -> gloo, nccl)."""
    return {part.split(":")[-1].strip().lower() for part in spec.split(",") if part.strip()}


def setup_group_backend(group_backend: str, default_backend: str) -> Optional[str]:
    """The backend to move data with when the EP group was given for setup only, else ``None``.

    DeepEP uses the group it is given only to exchange buffer handles, so frameworks may pass
    their CPU group (vLLM's V1 managers pass ``cpu_group``, a Gloo group). When that group is
    Gloo-only while the default group moves accelerator tensors with an accelerator's backend
    (``nccl``, ``hccl``, ``xccl``: the process has that accelerator), the exchanges belong on
    that backend: through Gloo they would stage through host memory and could not be captured
    in a graph. A Gloo world (CPU runs, tests) keeps its group. Decided from the backends alone:
    probing a device runtime here would touch CUDA on an NPU process.
    """
    if _backends(group_backend) != {"gloo"}:
        return None
    used = _backends(default_backend)
    accelerators = [BACKENDS[kind] for kind in ("cuda", "npu", "xpu") if BACKENDS[kind] in used]
    return accelerators[0] if len(accelerators) == 1 else None


def data_backend(group: dist.ProcessGroup) -> Optional[str]:
    """:func:`setup_group_backend` for ``group`` in this process."""
    try:
        return setup_group_backend(dist.get_backend(group), dist.get_backend())
    except Exception:  # noqa: BLE001 - a group torch cannot describe: use it as given
        return None
