"""DeepEP V2 (``ElasticBuffer``, NCCL GIN): the kernels of DeepEP's current README table.

Normal mode: every SM of the call pushes rows (TMA copies), the copy into the outputs runs in an
epilogue that DeepEP's benchmark does not time; the SM count is sized from the traffic
(``get_theoretical_num_sms``) unless given. Up to 9 queue pairs per peer. V2's low-latency path
has no published numbers: it reuses V1's low-latency costs.
"""

from ..profile import Profile
from .fitted import FIT

PROFILE = Profile(
    name="deepep_v2",
    description="DeepEP V2 kernels (NCCL GIN): analytic SM count, untimed copy epilogue",
    family="deepep_v2",
    sms=0,
    qps_per_peer=9,
    chunk_rows=30,
    combine_chunk_rows=20,
).with_fit({**FIT["shared"], **FIT["deepep_v1"], "sm_forward_gbs": FIT["shared"]["sm_copy_gbs"],
            **FIT["deepep_v2"]})
