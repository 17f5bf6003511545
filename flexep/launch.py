"""Run a function on N local ranks (Gloo on CPU), with a deadline and clean shutdown.

Used by ``flexep bench``/``stress``, the examples and the tests. Each rank is a spawned process
that joins a Gloo group, runs ``fn(rank, world_size, *args)`` and sends back its return value.
The parent enforces ``timeout`` on the whole run, kills stragglers, and re-raises the first
worker failure with that worker's traceback, so a broken run never hangs. Under ``torchrun``
use :func:`init_from_env` instead and call the function directly.

The rendezvous store lives in the parent (a ``TCPStore`` server the workers join as clients),
not in rank 0, so it outlives any worker, as torchrun's agent store does: after a rank dies,
the survivors can still agree on who is left and form a new group through it
(:mod:`flexep.elastic`). Workers find it through ``FLEXEP_STORE`` (``host:port``) and their
stable member id in ``FLEXEP_MEMBER_ID``. With ``replacements=N`` the parent starts a new
process, without a process group, each time a worker dies (at most N times); it can join the
running group through :mod:`flexep.elastic`.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .device import backend_for, default_device

__all__ = ["run_local", "free_port", "init_from_env", "WorkerError", "STORE_ENV", "MEMBER_ENV"]

STORE_ENV = "FLEXEP_STORE"  # host:port of a store that outlives every worker
MEMBER_ENV = "FLEXEP_MEMBER_ID"  # this process's stable id: its launch rank, or world_size + k


class WorkerError(RuntimeError):
    """A rank of :func:`run_local` failed; the message holds its traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Set in every worker before it starts (the caller's environment wins over these defaults):
# one thread per rank, since ranks share the cores; transparent huge pages for large tensors,
# which PyTorch reads once at its first allocation and which makes first-touching a fresh 50 MB
# receive buffer about 4x cheaper on CPU; and no warning from the CPU wheel of torch that NumPy
# is missing (flexep does not use NumPy), printed once per worker otherwise.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "THP_MEM_ALLOC_ENABLE": "1",
              "PYTHONWARNINGS": "ignore:Failed to initialize NumPy:UserWarning"}


@contextlib.contextmanager
def _child_environment(env: dict):
    """Apply ``env`` (without overriding what the caller already set) while children start."""
    added = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _dumps(obj) -> bytes:
    # torch.save, not pickle: it handles every dtype (float8 included) and copies the bytes
    # instead of handing over shared-memory segments that die with the worker.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank: int, world: int, port: int, fn: Callable, args: Sequence, results,
            pg_timeout: float, env: dict) -> None:
    """Rank ``rank`` (< ``world``: joins the initial group; otherwise a replacement, no group)."""
    os.environ.update(env)
    os.environ[STORE_ENV], os.environ[MEMBER_ENV] = f"127.0.0.1:{port}", str(rank)
    torch.set_num_threads(1)
    try:
        if rank < world:
            store = dist.TCPStore("127.0.0.1", port, is_master=False,
                                  timeout=timedelta(seconds=pg_timeout))
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=pg_timeout))
        out = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent, which re-raises
        out = ("error", traceback.format_exc())
    try:
        payload = _dumps(out)
    except Exception:  # noqa: BLE001 - an unpicklable result is itself a reportable failure
        payload = _dumps(("error", traceback.format_exc()))
    results.put((rank, payload))
    # A worker that exits while its queue feeder still holds data loses it: flush first.
    results.close()
    results.join_thread()
    # After a failed exchange Gloo's teardown waits for the abandoned operation until the
    # group's own timeout (also after a recovery, whose retired groups hold such operations);
    # the result is already reported, so leave at once.
    if out[0] == "error":
        os._exit(1)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - teardown after a failure must not mask it
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_local(fn: Callable[..., Any], world_size: int, args: Sequence = (), *, timeout: float = 300.0,
              pg_timeout: Optional[float] = None, env: Optional[dict] = None,
              allow_failures: bool = False, replacements: int = 0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` Gloo ranks; return results by rank.

    ``fn`` must be importable (module level). With ``allow_failures`` a failed or killed rank
    yields a :class:`WorkerError` in its slot instead of raising (for fault-injection tests).
    ``replacements``: how many replacement processes may be started, one per worker that dies
    without a result; replacement k runs ``fn(world_size + k, world_size, *args)`` with no
    process group initialised, and its result follows the ranks' in the returned list.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    pg_timeout = pg_timeout if pg_timeout is not None else max(timeout, 60.0)
    # The store server lives here, in the parent: it outlives every worker (port 0: the OS picks).
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=pg_timeout))
    worker_env, port = {**WORKER_ENV, **(env or {})}, store.port

    def start(rank: int):
        p = ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, results, pg_timeout,
                                              dict(env or {})), daemon=True)
        with _child_environment(worker_env):
            p.start()
        return p

    procs = [start(r) for r in range(world_size)]
    replaced: set = set()
    out: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < len(procs) and time.monotonic() < deadline:
            try:
                rank, payload = results.get(timeout=0.2)
                out[rank] = _loads(payload)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode is not None]
                for r in dead:
                    if r not in replaced and len(procs) - world_size < replacements:
                        replaced.add(r)
                        procs.append(start(len(procs)))
                if dead and all(r in out or p.exitcode is not None for r, p in enumerate(procs)):
                    break
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    slots = []
    for r in range(len(procs)):
        if r in out and out[r][0] == "ok":
            slots.append(out[r][1])
            continue
        if r in out:
            err = WorkerError(f"rank {r} failed:\n{out[r][1]}")
        elif time.monotonic() >= deadline:
            err = WorkerError(f"rank {r} did not finish within {timeout:g} s (killed)")
        else:
            err = WorkerError(f"rank {r} exited with code {procs[r].exitcode} without a result")
        if not allow_failures:
            raise err
        slots.append(err)
    return slots


def init_from_env(backend: Optional[str] = None) -> torch.device:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    The backend follows this process's device (:func:`flexep.device.default_device`): ``nccl``
    on CUDA, ``hccl`` on Ascend, ``xccl`` on Intel GPUs, ``gloo`` on CPU; the accelerator is
    ``LOCAL_RANK``-th of the node's and becomes the current one. Returns that device.
    """
    device = default_device()
    if device.type != "cpu":
        mod = getattr(torch, device.type)
        mod.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or backend_for(device.type))
    return device
