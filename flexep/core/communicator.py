"""The core API: an expert-parallel communicator over one process group.

:class:`Communicator` is what every face is built on (DeepEP's V1 ``Buffer``, DeepEP V2's
``EPBuffer``, :mod:`flexep.autograd`, :class:`flexep.moe.MoELayer`): frozen requests in
(:mod:`flexep.algorithms.contract`), frozen results and typed handles out. Each call:

1. builds and checks its request locally (structure always; values on the device, see
   :mod:`flexep.core.checks`). A request may be given as a callable that builds it, so that
   errors raised while building it (a face's own argument checks) are reported collectively
   too;
2. runs one control round (:mod:`flexep.comm.control`): a bad input, a mismatched argument or a
   skipped call on *any* rank raises on *every* rank, and the routing counts arrive;
3. hands the request to its algorithm object (flat or hierarchical, low-latency), which moves
   data through the transport under one deadline;
4. records the bytes sent next to the routing's minimum (:mod:`flexep.comm.accounting`).

Construction is collective over the group's members only (subgroups are created with
``use_local_synchronization``), so an EP group that is part of a larger world needs nothing
from the other ranks.

The calls live in mixins by mode: :mod:`flexep.core.normal_calls` (layout, dispatch, cached
dispatch, combine), :mod:`flexep.core.sync_free_calls` (DeepEP V2's ``do_cpu_sync=False``) and
:mod:`flexep.core.ll_calls` (low-latency, shrink mode); this module holds construction, the
call lifecycle and the shared steps.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..algorithms.flat import Flat
from ..algorithms.hierarchical import Hierarchical
from ..algorithms.low_latency import LowLatency
from ..algorithms.slot_combine import SlotCombine
from ..algorithms.sync_free import SyncFree
from ..comm import channels
from ..comm.control import ControlPlane, Header
from ..comm.failure import FailureDetector
from ..comm.topology import Topology, build_topology_groups, resolve_ranks_per_node, subgroup
from ..comm.transport import Transport
from ..device import data_backend, group_carries
from . import checks as C
from . import ll_agreement
from .ll_calls import LowLatencyCalls
from .normal_calls import NormalCalls, Requested
from .sync_free_calls import SyncFreeCalls

__all__ = ["Options", "Communicator"]


@dataclass(frozen=True)
class Options:
    """How a :class:`Communicator` runs (every rank must pass the same).

    Attributes:
        ranks_per_node: node shape for hierarchical exchange (default: ``FLEXEP_RANKS_PER_NODE``,
            torchrun's ``LOCAL_WORLD_SIZE``, else the ranks' host names). Smaller values make
            "virtual nodes" on one machine.
        hierarchical: use the two-hop algorithm when the group spans several nodes.
        num_channels: split every exchange into this many concurrent channels (own groups);
            ``None``: ``FLEXEP_NUM_CHANNELS``, else chosen from the backend and the node shape
            (:mod:`flexep.comm.channels`: 1 on one machine and on NCCL/HCCL/XCCL, several flows
            per network path on Gloo across machines).
        timeout: seconds a call may wait in total (default ``FLEXEP_TIMEOUT`` or 100).
        check_consistency: run the cross-rank agreement checks in calls that need no counts.
        validate: check tensor contents. ``None`` (default): in normal mode on every device
            (folded into the control round, no extra host read) and in low-latency mode for
            host tensors; ``True`` also in low-latency mode on accelerators (one host read per
            call); ``False`` never.
        verify: checksum every exchange (default ``FLEXEP_VERIFY``).
        generation: membership generation this communicator belongs to (:mod:`flexep.elastic`
            sets it for the group it forms); every control row carries it and rows of another
            generation raise :class:`~flexep.errors.StaleGenerationError` on every rank.
    """

    ranks_per_node: Optional[int] = None
    hierarchical: bool = True
    num_channels: Optional[int] = None
    timeout: Optional[float] = None
    check_consistency: bool = True
    validate: Optional[bool] = None
    verify: Optional[bool] = None
    generation: int = 0


def resolve_timeout(timeout) -> float:
    """``timeout`` checked, or ``FLEXEP_TIMEOUT`` / 100 s when None."""
    if timeout is None:
        timeout = float(os.environ.get("FLEXEP_TIMEOUT", "100"))
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


class Communicator(NormalCalls, SyncFreeCalls, LowLatencyCalls):
    """Dispatch and combine over ``group`` (collective: every rank of it constructs one).

    Args:
        group: the EP process group (NCCL, HCCL, XCCL, Gloo, or any backend moving the call's
            tensors). An accelerator-only group gets a CPU (Gloo) side group for control rows
            that must not touch the device.
        options: :class:`Options`.
        agree: extra ``name -> int`` values every rank must pass equally (a face's own
            construction arguments); a disagreement raises ``ValueError`` on every rank.
        error: a construction error found by the face; shipped so every rank raises.
        label: how errors name the object (``"Buffer"`` for the DeepEP face).
        fault_hook: test-only callable invoked with a phase name at each phase boundary.
    """

    def __init__(self, group: dist.ProcessGroup, options: Options = Options(), *,
                 agree: Optional[dict] = None, error: Optional[BaseException] = None,
                 label: str = "Communicator", fault_hook: Optional[Callable[[str], None]] = None) -> None:
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
        # A Gloo group handed over for setup only (DeepEP's contract allows it): data moves on a
        # group of the accelerator's backend over the same ranks, control over the given one.
        setup_group, native = group, data_backend(group)
        if native is not None:
            group = subgroup(group, list(range(group.size())), backend=native)
        self.group = group
        self.rank, self.world = group.rank(), group.size()
        num_channels, paths, timeout = 1, 1, resolve_timeout(None)
        try:
            num_channels = channels.requested_channels(options.num_channels)
            paths = channels.net_paths() if num_channels == channels.AUTO else 0
            timeout = resolve_timeout(options.timeout)
        except (TypeError, ValueError) as exc:
            error = error or exc
        verify = options.verify
        if verify is None:
            verify = os.environ.get("FLEXEP_VERIFY", "0") not in ("", "0")
        self.options = options
        self.check_consistency = bool(options.check_consistency)
        self.validate = options.validate
        self._layout_stamp: Optional[C.LayoutStamp] = None  # the last get_dispatch_layout's tensors
        # Control rows that must not touch the device go over the host; an accelerator-only
        # group cannot move CPU tensors, so it gets a Gloo side group over the same ranks.
        if native is not None:
            self.host_group = setup_group
        elif group_carries(group, "cpu"):
            self.host_group = None
        else:
            self.host_group = subgroup(group, list(range(self.world)), backend="gloo")
        try:
            rpn = resolve_ranks_per_node(group, options.ranks_per_node, self.host_group)
            self.topology = Topology(self.world, rpn)
        except (TypeError, ValueError) as exc:
            error, self.topology = error or exc, Topology(self.world, self.world)
        self.hierarchical = bool(options.hierarchical) and self.topology.is_multi_node
        global_ranks = dist.get_process_group_ranks(group)
        store_host = global_ranks.index(0) if 0 in global_ranks else None
        tp = Transport(group, self.topology, timeout, verify=bool(verify), fault_hook=fault_hook)
        control = ControlPlane(tp, self.host_group, generation=int(options.generation))
        # One round before any group is created: a shared id (names the store keys) and a check
        # that every rank built it the same way. new_group waits for all members, so ranks
        # creating different numbers of groups would otherwise block instead of raising.
        agree = dict(agree or {})
        values = [random.getrandbits(62), channels.host_id(), self.topology.ranks_per_node, num_channels,
                  paths, int(self.hierarchical), *agree.values()]
        tp.begin("init")
        control.extra_width = len(values)
        header = control.round("init", error=error, check=False, extra=torch.tensor(values))
        names = ("ranks_per_node", "num_channels", "FLEXEP_NET_PATHS", "hierarchical", *agree)
        for col, name in enumerate(names, start=2):
            column = header.extra[:, col].tolist()
            if len(set(column)) > 1:
                if name == "num_channels":  # the default travels as AUTO
                    column = [None if v == channels.AUTO else v for v in column]
                raise ValueError(f"{label}: ranks disagree on {name}: {column}; every rank must "
                                 "construct with the same value")
        self.uid = int(header.extra[0, 0])
        if num_channels == channels.AUTO:
            num_channels = channels.auto_channels(self.topology, header.extra[:, 1].tolist(),
                                                  dist.get_backend(group), self.hierarchical, paths)
        tp.detector = FailureDetector(self.uid, self.rank, self.world, store_host)
        lanes: dict = {"ep": [subgroup(group, list(range(self.world))) for _ in range(num_channels - 1)]}
        groups = None
        if self.hierarchical:
            groups = build_topology_groups(group, self.topology)
            extra = [build_topology_groups(group, self.topology) for _ in range(num_channels - 1)]
            lanes["intra"], lanes["rail"] = [g.intra for g in extra], [g.rail for g in extra]
        tp.channels = lanes  # before the algorithms: they size their control columns by it
        self.normal = Hierarchical(tp, groups, self.uid) if groups is not None else Flat(tp, self.uid)
        self.low_latency = LowLatency(tp, self.uid)
        self.sync_free, self.slot_combine = SyncFree(tp, self.uid), SlotCombine(tp, self.uid)
        self.num_channels = num_channels
        self._tp: Optional[Transport] = tp
        # Every later round carries the algorithm's extras and per-destination expert counts
        # (their width grows, agreed, on the first dispatch with more local experts).
        control.extra_width, control.per_dest_width = self.normal.extra_width, 0
        self.control = control
        self.in_band = ll_agreement.InBand(control)

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def transport(self) -> Transport:
        if self._tp is None:
            raise RuntimeError("this communicator was destroyed; create a new one")
        return self._tp

    def destroy(self) -> None:
        """Release the communicator's state (never blocks on peers)."""
        self._tp = None

    @property
    def alive(self) -> bool:
        return self._tp is not None

    def ensure_alive(self) -> None:
        """Raise ``RuntimeError`` if the communicator was destroyed."""
        self.transport  # noqa: B018 - the property raises once destroyed

    @property
    def last_traffic(self):
        """:class:`~flexep.comm.accounting.TrafficStats` of this rank's last call."""
        return self.transport.stats

    def _begin(self, op: str) -> Transport:
        tp = self.transport
        tp.begin(op)
        return tp

    @staticmethod
    def _build(request: Requested, check: Callable[[object], None]):
        """``(request, None)`` or ``(None, error)`` for a request or a builder callable."""
        try:
            req = request() if callable(request) else request
            check(req)
            return req, None
        except (TypeError, ValueError) as exc:
            return None, exc

    def _agreement(self, op: str, error: Optional[BaseException], values: Callable[[], dict],
                   **ride) -> Optional[Header]:
        """The control round of a call that needs no counts, if ``check_consistency`` is on
        (its header, else None); ``ride``: the call's payload offer (``ride``/``offer`` of
        :meth:`ControlPlane.round`).

        Without the round a local input error is raised here, on this rank only: a round run by
        this rank alone would meet a peer's payload exchange; the peers then time out naming
        this rank.
        """
        if not self.check_consistency:
            if error is not None:
                raise error
            return None
        return self.control.round(op, error=error, check=True, **({} if error else values()),
                                  **({} if error else ride))

    def _validate_now(self, t: torch.Tensor) -> bool:
        """Whether a host-side value check runs for ``t`` (free on the host, asked for elsewhere)."""
        return self.validate is True or (self.validate is None and t.device.type == "cpu")

    def barrier(self, op: str = "barrier", error: Optional[BaseException] = None, **values: int) -> None:
        """A control round that every rank must make (raises everywhere on a local ``error``)."""
        self._begin(op)
        self.control.round(op, error=error, check=self.check_consistency, **values)
