"""``deep_ep.buffers.legacy`` (V1 ``Buffer``), from flexep."""

from flexep import Buffer, Config  # noqa: F401
