"""Implementation profiles: how well one EP implementation uses whatever hardware it runs on.

The hardware (:mod:`flexep.planner.hardware`) says what the links and NICs can do; a
:class:`Profile` says what an implementation's kernels cost on top: the fraction of line rate its
transfers reach, how many SMs a call occupies and how many bytes each SM moves, fixed costs per
call, per peer and per message, and the low-latency mode's per-expert work. ``family`` picks the
cost structure of :mod:`flexep.planner.model` (which SMs copy what, which passes are timed):

* ``"deepep_v1"``: DeepEP V1's kernels. Intranode: half of the SMs push rows to peers over
  NVLink, the other half copy received rows out. Internode: per channel one SM stages rows for
  RDMA and copies received rows out, the other forwards arrivals over NVLink. Low latency: one
  message per (token, expert), the receive side of each local expert runs on its own warps.
* ``"deepep_v2"``: DeepEP V2 (``ElasticBuffer``): every SM of the call pushes rows (staging and
  forwarding); the copy into the outputs runs in a separate epilogue that DeepEP's benchmark
  does not time. ``sms = 0`` sizes the SM count from the traffic, as V2 does.
* ``"flexep"``: flexep over a collective library (NCCL): the count exchange and a host read,
  one all-to-all per hop run one after the other, and separate memory-bound passes (packing,
  reordering, reduction, casts) bounded by the accelerator's HBM.

Profiles are found by name in :mod:`flexep.planner.profiles`; their fitted numbers come from
:mod:`flexep.planner.profiles.fitted`, written by the calibration against DeepEP's tables.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, fields, replace

__all__ = ["Profile", "FAMILIES", "get_profile", "profile_names", "FITTED_FIELDS"]

FAMILIES = ("deepep_v1", "deepep_v2", "flexep")

# Profile fields the calibration may fit; the others describe the implementation's structure.
FITTED_FIELDS = ("scaleup_efficiency", "rdma_efficiency", "sm_copy_gbs", "sm_forward_gbs",
                 "proxy_message_us", "launch_us", "peer_us", "ll_launch_us", "ll_message_us",
                 "ll_token_us")


@dataclass(frozen=True)
class Profile:
    """Costs of one EP implementation, independent of the hardware it runs on.

    Attributes:
        name, description: how it is listed.
        family: cost structure, one of :data:`FAMILIES`.
        calibrated: the numbers were fitted to published measurements of this implementation
            (False: estimates; see the profile's module docstring).
        scaleup_efficiency: fraction of ``ScaleUp.bandwidth_gbs`` its scale-up transfers reach.
        rdma_efficiency: fraction of the NIC line rate its RDMA writes reach.
        sms: SMs a normal-mode call occupies (0: sized from the traffic, ``deepep_v2``).
        sm_copy_gbs: GB/s one SM moves in the scale-up kernel (rows pushed to peers or copied out).
        sm_forward_gbs: GB/s one SM moves in the network kernel (staging for RDMA, forwarding,
            copying out).
        qps_per_peer: queue pairs (flows) per peer, what ECMP hashes.
        balanced_modes: modes whose rows are steered over a peer's flows by their measured
            arrival, so a peer's bytes spread evenly over the distinct paths its flows were
            hashed onto (:mod:`flexep.planner.ecmp`); other modes put equal bytes on each flow.
        chunk_rows, combine_chunk_rows: rows per RDMA write in normal dispatch / combine (a
            proxy posts one write per chunk and one tail update after it).
        proxy_message_us: CPU time a proxy thread spends per RDMA write it posts for the GPU
            (post, doorbell, completion), on NICs the GPU cannot drive (``Nic.initiator``).
        launch_us: fixed cost of a normal call (launch, count exchange, completion).
        peer_us: cost per peer a rank exchanges with in a normal call (handshakes, tails).
        ll_launch_us: fixed cost of a low-latency call (launch, count signals, completion).
        ll_message_us: GPU time to issue one low-latency message.
        ll_token_us: low-latency work per (token, expert) of one local expert; one expert's
            tokens are handled one after the other, different experts in parallel.
        ll_capacity: low latency moves a fixed capacity of rows to every peer (flexep) instead
            of one message per (token, expert).
        host_sync_us: normal dispatch waits for the host to read the counts (flexep).
        memory_passes: extra HBM reads and writes of every sent and received row (separate
            packing, reordering and reduction kernels; 0 when fused into the copies).
        cast_passes: HBM passes over the input of a quantized dispatch (separate cast kernel).
    """

    name: str
    description: str
    family: str
    calibrated: bool = True
    scaleup_efficiency: float = 0.7
    rdma_efficiency: float = 0.9
    sms: int = 24
    sm_copy_gbs: float = 25.0
    sm_forward_gbs: float = 15.0
    qps_per_peer: int = 12
    balanced_modes: tuple = ()
    chunk_rows: int = 16
    combine_chunk_rows: int = 16
    proxy_message_us: float = 1.0
    launch_us: float = 20.0
    peer_us: float = 0.5
    ll_launch_us: float = 25.0
    ll_message_us: float = 0.01
    ll_token_us: float = 0.02
    ll_capacity: bool = False
    host_sync_us: float = 0.0
    memory_passes: float = 0.0
    cast_passes: float = 0.0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"Profile.family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("scaleup_efficiency", "rdma_efficiency"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"Profile.{name} is a fraction of line rate in (0, 1], got {v}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise ValueError(f"Profile.{f.name} must be >= 0, got {v}")
        if self.sm_copy_gbs <= 0 or self.sm_forward_gbs <= 0:
            raise ValueError(f"Profile SM rates must be positive, got sm_copy_gbs={self.sm_copy_gbs}, "
                             f"sm_forward_gbs={self.sm_forward_gbs}")
        if min(self.qps_per_peer, self.chunk_rows, self.combine_chunk_rows) < 1:
            raise ValueError(f"Profile.qps_per_peer, chunk_rows and combine_chunk_rows must be >= 1, got "
                             f"{self.qps_per_peer}, {self.chunk_rows}, {self.combine_chunk_rows}")

    def with_fit(self, values: dict) -> Profile:
        """This profile with the fitted fields in ``values`` replaced (others ignored)."""
        return replace(self, **{k: v for k, v in values.items() if k in FITTED_FIELDS})


def profile_names() -> list[str]:
    """Names of the shipped profiles (modules of :mod:`flexep.planner.profiles`), sorted."""
    return list(_shipped_profiles())


@functools.lru_cache(maxsize=1)
def _shipped_profiles() -> tuple:
    # Listing the package's modules costs ~20 us; a calibration looks profiles up ~10^4 times.
    from . import profiles
    return tuple(sorted(m.name for m in pkgutil.iter_modules(profiles.__path__)
                        if not m.name.startswith("_") and m.name != "fitted"))


def get_profile(name: str) -> Profile:
    """The ``PROFILE`` of profile ``name`` (see :func:`profile_names`)."""
    if isinstance(name, Profile):
        return name
    names = profile_names()
    if name not in names:
        raise ValueError(f"unknown implementation profile {name!r}; available: {', '.join(names)}")
    prof = getattr(importlib.import_module(f"flexep.planner.profiles.{name}"), "PROFILE", None)
    if not isinstance(prof, Profile):
        raise TypeError(f"profile module {name!r} must define PROFILE = Profile(...)")
    return prof
