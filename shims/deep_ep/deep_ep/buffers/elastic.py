"""``deep_ep.buffers.elastic`` (V2.0), from flexep."""

from flexep import ElasticBuffer, EPHandle  # noqa: F401
