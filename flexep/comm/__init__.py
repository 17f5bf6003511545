"""Communication layer: everything between an algorithm and ``torch.distributed``.

* :mod:`~flexep.comm.transport` — the start/wait exchange primitive, deadlines, channels;
* :mod:`~flexep.comm.control` — the per-call control round (agreement, verdicts, counts);
* :mod:`~flexep.comm.failure` — roll calls and failure reports through the store;
* :mod:`~flexep.comm.accounting` — bytes sent next to the routing's minimum;
* :mod:`~flexep.comm.verify` — opt-in checksums of every exchange;
* :mod:`~flexep.comm.topology` — node shape, node/rail subgroups;
* :mod:`~flexep.comm.objects` — NumPy-free gathers of small Python objects;
* :mod:`~flexep.comm.workspace` — scratch memory reused across calls.
"""
