"""Published results of other systems, for a held-out test of the planner: never fitted.

Each source lists where its numbers come from (repository, file, commit), the hardware preset
that describes its machines (filled from datasheets, see each preset's docstring), the profile
whose kernels it runs, the workload its benchmark used and its rows as
``(ep, phase, metric, value)``. Metrics are computed as the source's benchmark computes them
(:mod:`flexep.planner.metrics`); where the expert count does not divide the EP size, 256 experts
are used, as DeepEP's tests do. Where a detail of the setup is not published, ``assumed`` says
what the planner assumes.
"""

SOURCES = (
    {
        "key": "uccl_p5en_normal",
        "system": "UCCL-EP (DeepEP V1 kernels, CPU-proxy RDMA) on AWS p5en",
        "cite": "github.com/uccl-project/uccl ep/README.md @ fc42e1b2 (2026-02-27), 'On p5en' "
                "normal table",
        "preset": "h200_efa", "profile": "deepep_v1", "mode": "hierarchical", "sms": 24,
        "shape": {"tokens_per_rank": 4096, "num_experts": 288},
        "routing": "group_limited",
        "assumed": "288 experts (the README's internode command; its intranode command uses 256, which "
                   "changes EP8 by under 1%); 24 SMs (UCCL's CUDA tests)",
        "rows": ((8, "dispatch", "nvl_gbs", 320), (8, "combine", "nvl_gbs", 319),
                 (16, "dispatch", "rdma_gbs", 50), (16, "combine", "rdma_gbs", 18),
                 (24, "dispatch", "rdma_gbs", 53), (24, "combine", "rdma_gbs", 26),
                 (32, "dispatch", "rdma_gbs", 54), (32, "combine", "rdma_gbs", 43)),
    },
    {
        "key": "uccl_p6_normal",
        "system": "UCCL-EP (DeepEP V1 kernels, CPU-proxy RDMA) on AWS p6-b200",
        "cite": "github.com/uccl-project/uccl ep/README.md @ fc42e1b2 (2026-02-27), 'On p6-b200' "
                "normal table",
        "preset": "b200_efa", "profile": "deepep_v1", "mode": "hierarchical", "sms": 24,
        "shape": {"tokens_per_rank": 4096, "num_experts": 288},
        "routing": "group_limited",
        "assumed": "as uccl_p5en_normal",
        "rows": ((8, "dispatch", "nvl_gbs", 280), (8, "combine", "nvl_gbs", 426),
                 (16, "dispatch", "rdma_gbs", 53), (16, "combine", "rdma_gbs", 60),
                 (24, "dispatch", "rdma_gbs", 53), (24, "combine", "rdma_gbs", 59),
                 (32, "dispatch", "rdma_gbs", 53), (32, "combine", "rdma_gbs", 57)),
    },
    {
        "key": "uccl_p5en_ll",
        "system": "UCCL-EP low latency on AWS p5en",
        "cite": "github.com/uccl-project/uccl ep/README.md @ fc42e1b2 (2026-02-27), 'On p5en' "
                "low-latency table",
        "preset": "h200_efa", "profile": "deepep_v1", "mode": "low_latency", "sms": 0,
        "shape": {"tokens_per_rank": 128, "num_experts": 288},
        "routing": "uniform", "masked_slots": 10,
        "assumed": "288 experts (the README's command), 10 masked slots (DeepEP's test)",
        "rows": ((16, "dispatch", "latency_us", 226), (16, "combine", "latency_us", 293),
                 (24, "dispatch", "latency_us", 386), (24, "combine", "latency_us", 580),
                 (32, "dispatch", "latency_us", 465), (32, "combine", "latency_us", 694)),
    },
    {
        "key": "uccl_p6_ll",
        "system": "UCCL-EP low latency on AWS p6-b200",
        "cite": "github.com/uccl-project/uccl ep/README.md @ fc42e1b2 (2026-02-27), 'On p6-b200' "
                "low-latency table",
        "preset": "b200_efa", "profile": "deepep_v1", "mode": "low_latency", "sms": 0,
        "shape": {"tokens_per_rank": 128, "num_experts": 288},
        "routing": "uniform", "masked_slots": 10,
        "assumed": "as uccl_p5en_ll",
        "rows": ((16, "dispatch", "latency_us", 228), (16, "combine", "latency_us", 318),
                 (24, "dispatch", "latency_us", 448), (24, "combine", "latency_us", 566),
                 (32, "dispatch", "latency_us", 406), (32, "combine", "latency_us", 617)),
    },
    {
        "key": "uccl_mi300x_normal",
        "system": "UCCL-EP (DeepEP V1 kernels ported to ROCm, CPU-proxy RDMA) on MI300X + CX7",
        "cite": "github.com/uccl-project/uccl ep/README.md @ fc42e1b2 (2026-02-27), 'On AMD MI300X with CX7 "
                "InfiniBand' normal table (FP8 dispatch column)",
        "preset": "mi300x_ib", "profile": "deepep_v1", "mode": "hierarchical", "sms": 64,
        "shape": {"tokens_per_rank": 4096, "num_experts": 288},
        "routing": "group_limited",
        "assumed": "64 CUs (UCCL's ROCm tests below 4 nodes; 32 at 4 nodes and more), 288 experts "
                   "(256 at EP64, which 288 does not divide)",
        "rows": ((8, "dispatch", "nvl_gbs", 260), (8, "combine", "nvl_gbs", 304),
                 (16, "dispatch", "rdma_gbs", 74), (16, "combine", "rdma_gbs", 78),
                 (32, "dispatch", "rdma_gbs", 60), (32, "combine", "rdma_gbs", 60),
                 (64, "dispatch", "rdma_gbs", 52), (64, "combine", "rdma_gbs", 51)),
    },
    {
        "key": "uccl_mi300x_ll",
        "system": "UCCL-EP low latency on MI300X + CX7",
        "cite": "github.com/uccl-project/uccl ep/README.md @ fc42e1b2 (2026-02-27), 'AMD MI300X with CX7 "
                "InfiniBand' low-latency table",
        "preset": "mi300x_ib", "profile": "deepep_v1", "mode": "low_latency", "sms": 0,
        "shape": {"tokens_per_rank": 128, "num_experts": 288},
        "routing": "uniform", "masked_slots": 10,
        "assumed": "288 experts, 10 masked slots",
        "rows": ((8, "dispatch", "latency_us", 65), (8, "combine", "latency_us", 92),
                 (16, "dispatch", "latency_us", 136), (16, "combine", "latency_us", 207),
                 (32, "dispatch", "latency_us", 224), (32, "combine", "latency_us", 341)),
    },
    {
        "key": "ascend_a3_normal",
        "system": "DeepEP-Ascend (sgl-kernel-npu) normal kernels on the A3 SuperPoD",
        "cite": "github.com/sgl-project/sgl-kernel-npu README.md @ e33aa85f (2025-11-07), 'Normal Kernels "
                "with Pure HCCS'",
        "preset": "ascend_a3_superpod", "profile": "deepep_v1", "mode": "hierarchical", "sms": 0,
        "shape": {"tokens_per_rank": 4096, "num_experts": 256, "dispatch_dtype": "int8"},
        "routing": "uniform",
        "assumed": "256 experts and uniform top-8 (tests/python/deepep/test_intranode.py defaults); GB/s "
                   "counts received tokens x hidden x 2 for both phases (that test's "
                   "dispatch_bf16_recv_bytes)",
        "rows": ((8, "dispatch", "bf16_gbs", 146), (8, "combine", "bf16_gbs", 125),
                 (16, "dispatch", "bf16_gbs", 107), (16, "combine", "bf16_gbs", 103),
                 (32, "dispatch", "bf16_gbs", 102), (32, "combine", "bf16_gbs", 95),
                 (64, "dispatch", "bf16_gbs", 81), (64, "combine", "bf16_gbs", 91),
                 (128, "dispatch", "bf16_gbs", 57), (128, "combine", "bf16_gbs", 81)),
    },
    {
        "key": "ascend_a3_ll",
        "system": "DeepEP-Ascend (sgl-kernel-npu) low-latency kernels on the A3 SuperPoD",
        "cite": "github.com/sgl-project/sgl-kernel-npu README.md @ e33aa85f (2025-11-07), 'Low-Latency "
                "Kernels with Pure HCCS'",
        "preset": "ascend_a3_superpod", "profile": "deepep_v1", "mode": "low_latency", "sms": 0,
        "shape": {"tokens_per_rank": 128, "num_experts": 256, "dispatch_dtype": "int8"},
        "routing": "uniform",
        "assumed": "256 experts (test_low_latency.py default), no masked slots",
        "rows": ((8, "dispatch", "latency_us", 132), (8, "combine", "latency_us", 126),
                 (16, "dispatch", "latency_us", 139), (16, "combine", "latency_us", 135),
                 (32, "dispatch", "latency_us", 153), (32, "combine", "latency_us", 151)),
    },
    {
        "key": "pplx_deepep_cx7_ll",
        "system": "DeepEP V1 low latency on H200 + CX7, measured by Perplexity",
        "cite": "github.com/perplexityai/pplx-garden docs/fabric-lib.md (2025), 'Decode (128 tokens)' table, "
                "DeepEP-CX7 columns",
        "preset": "h200_ib", "profile": "deepep_v1", "mode": "low_latency", "sms": 0,
        "shape": {"tokens_per_rank": 128, "num_experts": 256},
        "routing": "uniform",
        "assumed": "H200 nodes (Perplexity's deployment; the table names only the NIC), 256 experts, "
                   "FP8 dispatch",
        "rows": ((8, "dispatch", "latency_us", 42.6), (8, "combine", "latency_us", 72.0),
                 (16, "dispatch", "latency_us", 123.9), (16, "combine", "latency_us", 203.0),
                 (32, "dispatch", "latency_us", 159.1), (32, "combine", "latency_us", 285.0),
                 (64, "dispatch", "latency_us", 177.9), (64, "combine", "latency_us", 325.0)),
    },
)
