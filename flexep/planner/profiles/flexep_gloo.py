"""flexep over Gloo (TCP, CPU tensors): what netbed measures (estimates, not calibrated).

The structure is flexep's (``family="flexep"``): a control round, then one all-to-all per hop,
the network hop finished before the forward hop starts, and separate passes over the rows
(packing, reordering, combine's reduction). What differs from NCCL on GPUs:

* the bytes are copied by the kernel's TCP stack on the same CPU cores the ranks run on: one
  "SM" (``sms=1``) copying at a few GB/s (``sm_copy_gbs``);
* a call's fixed cost is Python and Gloo's per-call work, milliseconds rather than
  microseconds (``launch_us``, ``peer_us``, ``host_sync_us`` for the control round);
* TCP over ``tbf`` reaches about 93% of the configured rate (headers, acknowledgements);
* one flow per peer per channel; ``qps_per_peer=1`` is the planner's count when no channels are
  given (one channel), not flexep's own default across machines (4 for 2 nodes x 2 ranks over 2
  paths, :mod:`flexep.comm.channels`): pass the channel count to compare with a default Buffer.
  Gloo sends a whole block per message, so there is no per-chunk posting cost;
* with several channels the hierarchical exchange steers each rail peer's rows over its flows
  by their measured arrival (``balanced_modes``): a pair's bytes spread over the distinct
  paths its flows were hashed onto. The flat exchange cuts evenly.
"""

from ..profile import Profile

PROFILE = Profile(
    name="flexep_gloo",
    description="flexep over Gloo/TCP on CPU tensors (netbed): a control round and one "
                "all-to-all per hop, kernel copies (estimated)",
    family="flexep",
    calibrated=False,
    scaleup_efficiency=0.8,
    rdma_efficiency=0.93,
    sms=1,
    sm_copy_gbs=3.0,
    sm_forward_gbs=3.0,
    qps_per_peer=1,
    balanced_modes=("hierarchical",),
    chunk_rows=1 << 20,
    combine_chunk_rows=1 << 20,
    proxy_message_us=0.0,
    launch_us=2000.0,
    peer_us=200.0,
    host_sync_us=1000.0,
    memory_passes=2.0,
    cast_passes=3.0,
)
