"""flexep over NCCL: what a user of this library gets on GPUs (estimates, not calibrated).

No published GPU measurements of flexep exist, so only the link efficiencies, the SM copy rate
and the cost of a proxy-posted write come from the DeepEP fit (NCCL's copies are SM load/stores
too, its network proxy posts like NVSHMEM's); the rest are estimates of the costs flexep's
structure adds, to be replaced by measurements:

* normal dispatch: a count exchange and a host read of the counts (``host_sync_us``) before the
  payload all-to-all; hierarchical runs its network and forward all-to-alls one after the other;
* packing, reordering and combine's reduction are separate memory-bound passes
  (``memory_passes`` HBM reads+writes of every sent and received row); an FP8/INT8 dispatch
  casts in a separate pass (``cast_passes``);
* NCCL's network transport posts through a CPU proxy thread (counted as ``proxy`` cost where the
  hardware says so; NCCL's proxy on GPU-initiated NICs is folded into ``peer_us``);
* low latency: fixed capacity, ``tokens_per_rank`` rows to every peer whatever the routing, no
  host sync.
"""

from ..profile import Profile
from .fitted import FIT

PROFILE = Profile(
    name="flexep_nccl",
    description="flexep over NCCL: host read + all-to-all per hop, separate memory passes, "
                "fixed-capacity low latency (estimated)",
    family="flexep",
    calibrated=False,
    sms=16,
    qps_per_peer=2,
    chunk_rows=64,
    sm_forward_gbs=FIT["shared"]["sm_copy_gbs"],
    launch_us=25.0,
    peer_us=2.0,
    ll_launch_us=25.0,
    ll_message_us=0.0,
    ll_token_us=0.0,
    ll_capacity=True,
    host_sync_us=30.0,
    memory_passes=2.0,
    cast_passes=3.0,
).with_fit(FIT["shared"])
