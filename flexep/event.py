"""Events and the communication stream, device-neutral (DeepEP's ``EventOverlap`` semantics).

On an accelerator with streams (CUDA, Ascend NPU, XPU) a call made with DeepEP's stream
arguments runs on the caller's communication stream:

* the communication stream first waits for ``previous_event`` if given, else for the current
  (compute) stream, so the inputs are ready;
* with ``async_finish=True`` the call returns an :class:`EventOverlap` recorded on the
  communication stream; the compute stream is *not* made to wait, and the event keeps the
  input and output tensors alive until it is waited (``event.current_stream_wait()``);
* otherwise the compute stream waits for the communication stream before the call returns.

Outputs are allocated on the communication stream and recorded on the compute stream (and
inputs on the communication stream), so the caching allocator never reuses their memory early,
whatever ``allocate_on_comm_stream`` says.

On devices without streams (the CPU, or an emulated device in tests) every call has finished
when it returns: events are already-completed markers and waiting on them is free.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Tuple

import torch

from .device import current_stream, device_module, new_stream

__all__ = ["EventHandle", "EventOverlap", "CommStreams", "StreamCall"]


class EventHandle:
    """An event recorded on the current stream of ``device`` at construction (no-op on CPU).

    ``device=None`` uses this process's current accelerator when it has streams.
    """

    def __init__(self, device: Optional[torch.device] = None, stream=None) -> None:
        if device is None:
            device = _current_accelerator()
        mod = device_module(device)
        self._event, self._mod, self.device = None, mod, device
        if mod is not None:
            self._event = mod.Event()
            self._event.record(stream if stream is not None else mod.current_stream(device))

    def current_stream_wait(self) -> None:
        """Make the current stream wait for this event (returns at once without streams)."""
        if self._event is not None:
            self._mod.current_stream(self.device).wait_event(self._event)

    def stream_wait(self, stream) -> None:
        """Make ``stream`` wait for this event."""
        if self._event is not None and stream is not None:
            stream.wait_event(self._event)


class EventOverlap:
    """DeepEP's ``EventOverlap``: an optional event plus tensors kept alive until it is waited.

    ``with event: ...`` runs the body, then makes the current stream wait on the event (if any).
    DeepEP V2 additions: one hook may run after the first wait (:meth:`register_hook_after_wait`)
    and :meth:`current_stream_wait` / :meth:`wait` return its result (how V2.5's
    ``defer_epilogue`` delivers a call's outputs; later waits return None);
    ``release_handle=True`` drops the event after the wait (``with event(release_handle=True):``).
    """

    def __init__(self, event: Optional[EventHandle] = None,
                 extra_tensors: Optional[Tuple[torch.Tensor, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors
        self.hook_after_wait: Optional[Callable[[], Any]] = None
        self._release_handle_by_call = False

    def current_stream_wait(self, release_handle: bool = False) -> Any:
        """Wait on the event, then run the registered hook once and return its result.

        Raises ``ValueError`` if this overlap holds no event.
        """
        if self.event is None:
            raise ValueError("this EventOverlap holds no event (the call ran with async_finish=False / "
                             "async_with_compute_stream=False)")
        self.event.current_stream_wait()
        self.extra_tensors = None
        hook, self.hook_after_wait = self.hook_after_wait, None  # cleared first: runs at most once
        result = hook() if hook is not None else None
        if release_handle:
            self.event = None
        return result

    def wait(self) -> Any:
        """DeepEP V2.5's name for :meth:`current_stream_wait`."""
        return self.current_stream_wait()

    def register_hook_after_wait(self, hook: Callable[[], Any]) -> None:
        """Run ``hook`` after the first wait (one hook at most)."""
        if self.hook_after_wait is not None:
            raise ValueError("this EventOverlap already has a hook after wait")
        self.hook_after_wait = hook

    def __call__(self, release_handle: bool = False) -> EventOverlap:
        self._release_handle_by_call = release_handle
        return self

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if self.event is not None:
            self.current_stream_wait(release_handle=self._release_handle_by_call)
        self._release_handle_by_call = False


def _current_accelerator() -> Optional[torch.device]:
    acc = getattr(torch, "accelerator", None)
    try:
        if acc is not None and acc.is_available():
            return acc.current_accelerator()
    except Exception:  # noqa: BLE001 - no usable accelerator runtime
        return None
    return None


class CommStreams:
    """One communication stream per device, created on first use (one per face object)."""

    def __init__(self) -> None:
        self._streams: dict = {}

    def get(self, device: Optional[torch.device]):
        if device is None or device_module(device) is None:
            return None
        if device not in self._streams:
            self._streams[device] = new_stream(device)
        return self._streams[device]

    def call(self, device: Optional[torch.device], previous_event: Optional[EventOverlap] = None,
             async_finish: bool = False) -> StreamCall:
        """A context for one call on ``device``'s communication stream (see :class:`StreamCall`)."""
        return StreamCall(device, self.get(device), previous_event, async_finish)


class StreamCall:
    """One call on the communication stream, with DeepEP's ordering (module docstring).

    Use as ``with streams.call(device, previous_event, async_finish) as call: ...;
    call.keep(tensors...)``; after the block ``call.event`` is the :class:`EventOverlap` to return.
    """

    def __init__(self, device: Optional[torch.device], stream, previous_event: Optional[EventOverlap],
                 async_finish: bool) -> None:
        self.device, self.stream, self.async_finish = device, stream, async_finish
        self.previous_event = previous_event
        self.event: Optional[EventOverlap] = None
        self._held: list = []
        self._scope = contextlib.nullcontext()
        self._compute = None

    def keep(self, *items) -> None:
        """Tensors (or tuples of tensors, or None) the call reads or returns."""
        for item in items:
            if isinstance(item, torch.Tensor):
                self._held.append(item)
            elif isinstance(item, (tuple, list)):
                self.keep(*item)

    def __enter__(self) -> StreamCall:
        if self.stream is not None:
            self._compute = current_stream(self.device)
            prev = self.previous_event
            if prev is not None and prev.event is not None:
                prev.event.stream_wait(self.stream)
            else:
                self.stream.wait_stream(self._compute)
            self._scope = device_module(self.device).stream(self.stream)
        self._scope.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._scope.__exit__(exc_type, exc, tb)
        if exc_type is not None:
            return
        held = tuple(self._held)
        if self.stream is None:
            self.event = EventOverlap(EventHandle(self.device) if self.async_finish else None,
                                      held if self.async_finish else None)
            return
        for t in held:
            t.record_stream(self.stream)
            t.record_stream(self._compute)
        if self.async_finish:
            self.event = EventOverlap(EventHandle(self.device, self.stream), held)
        else:
            self._compute.wait_stream(self.stream)
            self.event = EventOverlap(None)
