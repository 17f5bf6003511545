"""Published metrics, computed the way each benchmark computes them, from a prediction.

Benchmarks count bytes differently, so a published "GB/s" is only comparable with the same
count over the predicted time (``t`` below, per rank; row counts are means over ranks):

* ``latency_us``: the time itself.
* ``nvl_gbs`` (DeepEP V1 intranode, UCCL-EP): tokens received, own included, x ``hidden * 2``,
  times ``(1 + 4/128) / 2`` for an FP8 dispatch (data and scales, no metadata).
* ``rdma_gbs`` (DeepEP V1 internode, UCCL-EP): (token, destination node) pairs, own node
  included, x the same token bytes.
* ``ll_gbs`` (DeepEP low latency): valid (token, expert) selections x message bytes.
* ``v2_so_gbs`` / ``v2_su_gbs`` (DeepEP V2): (token, node) pairs / tokens received, own
  included, x the full row (data, scales, int64 top-k ids, float32 weights).
* ``bf16_gbs`` (DeepEP's Ascend port): tokens received x ``hidden * 2`` whatever the dispatch
  dtype (the INT8 payload is counted as BF16).
"""

from __future__ import annotations

from .plan import Prediction
from .workload import DTYPE_BYTES, ModelShape

__all__ = ["METRICS", "metric_value", "v2_row_bytes"]

METRICS = ("latency_us", "nvl_gbs", "rdma_gbs", "ll_gbs", "v2_so_gbs", "v2_su_gbs", "bf16_gbs")


def v2_row_bytes(shape: ModelShape, phase: str) -> int:
    """Bytes of one token as DeepEP V2's test counts it (``count_bytes`` of the received tensors)."""
    if phase == "dispatch":
        return shape.hidden * DTYPE_BYTES[shape.dispatch_dtype] + shape.scales_bytes + shape.topk * 12
    return shape.hidden * DTYPE_BYTES[shape.combine_dtype] + shape.topk * 4


def metric_value(pred: Prediction, metric: str, shape: ModelShape) -> float:
    """``metric`` (one of :data:`METRICS`) of ``pred``, a prediction for ``shape``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "latency_us":
        return pred.time_us
    per_us = pred.time_us * 1e3  # bytes per us -> GB/s
    rows = pred.counted
    if metric == "ll_gbs":
        return rows["selections"] * pred.row_bytes / per_us
    if metric in ("nvl_gbs", "rdma_gbs"):
        n = rows["recv_rows"] if metric == "nvl_gbs" else rows["node_pairs"]
        return n * shape.deepep_token_bytes(pred.phase) / per_us
    if metric in ("v2_so_gbs", "v2_su_gbs"):
        n = rows["node_pairs"] if metric == "v2_so_gbs" else rows["recv_rows"]
        return n * v2_row_bytes(shape, pred.phase) / per_us
    return rows["recv_rows"] * shape.hidden * 2 / per_us
