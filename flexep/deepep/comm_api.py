"""DeepEP V2.5's ``deep_ep.comm`` functions (the buffers' ``barrier``/``get_comm_stream``/domain
helpers take a buffer or a group). ``flexep.comm`` is flexep's communication layer, so these
names resolve there lazily, and the ``deep_ep`` shim's ``deep_ep.comm`` re-exports them."""

from __future__ import annotations

from typing import Optional

from .sizing import get_logical_domain_size, get_physical_domain_size

__all__ = ["barrier", "get_comm_stream", "get_physical_domain_size", "get_logical_domain_size",
           "get_nccl_comm_handle", "destroy_all_managed_nccl_comm", "NCCLCommHandle"]


class NCCLCommHandle:
    """DeepEP's handle of an NCCL communicator it manages; flexep manages none (a stand-in)."""


def barrier(buffer, wait_comm_stream: bool = True, with_cpu_sync: bool = False, sequential: bool = True,
            context_idx: Optional[int] = None) -> None:
    """A collective barrier over ``buffer``'s group."""
    buffer.barrier()


def get_comm_stream(buffer):
    """``buffer``'s communication stream (None on devices without streams)."""
    return buffer.get_comm_stream()


def get_nccl_comm_handle(group_or_buffer=None) -> None:
    """flexep uses the process group as given and creates no NCCL communicator of its own."""
    return None


def destroy_all_managed_nccl_comm() -> None:
    """Nothing to destroy: flexep manages no NCCL communicators (a no-op, as DeepEP's is when
    none were created)."""
