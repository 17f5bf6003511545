"""Communication layer: everything between an algorithm and ``torch.distributed``.

* :mod:`~flexep.comm.transport` — the start/wait exchange primitive, deadlines, channels;
* :mod:`~flexep.comm.control` — the per-call control round (agreement, verdicts, counts);
* :mod:`~flexep.comm.failure` — roll calls and failure reports through the store;
* :mod:`~flexep.comm.accounting` — bytes sent next to the routing's minimum;
* :mod:`~flexep.comm.verify` — opt-in checksums of every exchange;
* :mod:`~flexep.comm.topology` — node shape, node/rail subgroups;
* :mod:`~flexep.comm.objects` — NumPy-free gathers of small Python objects;
* :mod:`~flexep.comm.workspace` — scratch memory reused across calls.

DeepEP V2.5 names its public communication helpers ``deep_ep.comm`` (``barrier``,
``get_comm_stream``, ``get_physical_domain_size``, ...); with ``import flexep as deep_ep`` they
resolve here lazily from :mod:`flexep.deepep.comm_api`.
"""

_DEEPEP_NAMES = ("barrier", "get_comm_stream", "get_physical_domain_size", "get_logical_domain_size",
                 "get_nccl_comm_handle", "destroy_all_managed_nccl_comm", "NCCLCommHandle")


def __getattr__(name: str):
    if name in _DEEPEP_NAMES:
        from ..deepep import comm_api

        return getattr(comm_api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
