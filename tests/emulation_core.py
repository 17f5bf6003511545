"""Core of the emulated-accelerator harness: session registry, errors, caller frames, host reads.

Shared by every ``emulation_*`` module (no torch state is touched on import):

* :func:`current_session` / :func:`set_session`: what this process emulates (an
  ``emulation.Session``), set by ``emulation.emulate``;
* errors: :class:`EmulationError` and its kinds. Each one is also recorded in the session, so
  code under test that catches it cannot hide it;
* :func:`caller_frames`: the innermost stack frames outside torch, the standard library, pytest
  and this harness, i.e. the library code that made the mistake;
* the host-read guard: :func:`host_reads` counts, or forbids, device-to-host reads reported by
  the device tensors (:func:`report_read`), and records host-to-device copies
  (:func:`report_upload`) for the reports.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

__all__ = ["current_session", "set_session", "EmulationError", "DeviceMismatchError", "HostReadError",
           "EmulationLimitError", "WrongDeviceModuleError", "caller_frames", "format_frames", "describe",
           "HostRead", "HostReads", "host_reads", "report_read", "report_upload"]


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


class WrongDeviceModuleError(EmulationError):
    """The library called ``torch.cuda`` while working on another device type (``npu``)."""


class EmulationLimitError(EmulationError):
    """Something real devices do that this emulation cannot imitate (not a library defect)."""


_HERE = os.path.dirname(os.path.abspath(__file__))
_HARNESS_FILES = {os.path.join(_HERE, f"{name}.py") for name in
                  ("emulation", "emulation_core", "emulation_tensor", "emulation_indexing", "emulation_npu",
                   "emulation_group", "emulation_patches")}
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


def describe(t: torch.Tensor) -> str:
    dtype = str(t.dtype).replace("torch.", "")
    return f"{t.device} {dtype}{list(t.shape)}"


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


def report_read(kind: str, what: str, t: torch.Tensor) -> None:
    guards = _active()
    if not guards:
        return
    read = HostRead(kind, what, describe(t), tuple(caller_frames()))
    for g in guards:
        g.reads.append(read)
    if any(g.forbid for g in guards):
        raise HostReadError(f"device-to-host read where none is allowed: {read}")


def report_upload(what: str, t: torch.Tensor) -> None:
    """Record a host-to-device copy (allowed; counted for the reports)."""
    for g in _active():
        g.uploads.append(HostRead("h2d", what, describe(t), tuple(caller_frames(2))))
