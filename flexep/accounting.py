"""Stable import path: traffic accounting lives in :mod:`flexep.comm.accounting`."""

from .comm.accounting import (
    LINK_CLASSES,
    RoutingFlows,
    TrafficStats,
    flows_traffic,
    link_class_matrix,
    routing_flows,
    routing_traffic,
    wire_row_bytes,
)

__all__ = ["LINK_CLASSES", "RoutingFlows", "TrafficStats", "flows_traffic", "link_class_matrix",
           "routing_flows", "routing_traffic", "wire_row_bytes"]
