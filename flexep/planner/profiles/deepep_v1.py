"""DeepEP V1 (NVSHMEM, IBGDA): the kernels of DeepEP's legacy README tables.

Normal mode: 24 SMs (12 channels, DeepEP's tests), one queue pair per channel and peer, RDMA
writes of 30 rows in dispatch and 20 in combine (DeepEP's default configs for 32 to 64 ranks
when its tables were measured).
Intranode, even SMs push rows to peers over NVLink and odd SMs copy received rows out; internode,
per channel one SM stages rows for RDMA and copies received rows out while the other forwards
arrivals over NVLink. Low latency: one message per (token, expert), every SM issuing; each local
expert's receive work runs on its own warps. Calibrated on the V1 tables (H800 + CX7 IB);
its SM copy rate and link efficiencies are shared with V2's fit.
"""

from ..profile import Profile
from .fitted import FIT

PROFILE = Profile(
    name="deepep_v1",
    description="DeepEP V1 kernels (NVSHMEM/IBGDA): 24 SMs normal, per-(token, expert) low latency",
    family="deepep_v1",
    sms=24,
    qps_per_peer=12,
    chunk_rows=30,
    combine_chunk_rows=20,
).with_fit({**FIT["shared"], **FIT["deepep_v1"]})
