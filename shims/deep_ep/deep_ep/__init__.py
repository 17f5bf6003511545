"""``deep_ep`` served by flexep (the ``flexep-deep-ep`` shim): DeepEP's V1 ``Buffer``, V2.0
``ElasticBuffer`` and V2.5 ``EPBuffer`` APIs on any torch.distributed backend.

Import refuses to shadow a real DeepEP (see :func:`_real_deep_ep`); ``FLEXEP_DEEP_EP_SHIM=force``
overrides. Documentation: flexep's ``docs/deepep-v2.md``.
"""

import glob
import importlib.metadata
import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))
_OWN_DISTRIBUTION = "flexep-deep-ep"


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _real_deep_ep() -> list:
    """Signs of a real DeepEP: its compiled extension next to or beside this package, another
    ``deep_ep`` package on ``sys.path``, or an installed distribution named ``deep_ep``."""
    found = []
    for pattern in ("_C*.so", "_C*.pyd", os.path.join("..", "deep_ep_cpp*.so")):
        found += [f"compiled DeepEP extension {p}" for p in glob.glob(os.path.join(_HERE, pattern))]
    for entry in sys.path:
        init = os.path.join(entry or ".", "deep_ep", "__init__.py")
        if os.path.isfile(init) and os.path.realpath(os.path.dirname(init)) != _HERE:
            found.append(f"another deep_ep package at {os.path.dirname(init)}")
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if _normal(name) in ("deep-ep", "deepep"):
            found.append(f"installed distribution {name} {dist.version}")
    return found


if os.environ.get("FLEXEP_DEEP_EP_SHIM", "").lower() != "force":
    _found = _real_deep_ep()
    if _found:
        raise ImportError(
            "the flexep deep_ep shim refuses to shadow a real DeepEP installation ("
            + "; ".join(_found) + "). Uninstall one of them (pip uninstall flexep-deep-ep, or DeepEP), "
            "or set FLEXEP_DEEP_EP_SHIM=force to use flexep's implementation anyway.")

from flexep import (  # noqa: E402
    Buffer,
    BufferAllocator,
    BufferBase,
    Config,
    ElasticBuffer,
    EPBuffer,
    EPHandle,
    EventHandle,
    EventOverlap,
    destroy_all_managed_nccl_comm,
    get_buffer_size_hint,
    get_logical_domain_size,
    get_num_allocation_alignment,
    get_num_rdma_alignment,
    get_num_tma_alignment,
    get_physical_domain_size,
    topk_idx_t,
)

from . import buffers, comm, utils  # noqa: E402

__version__ = "2.5.0"  # the DeepEP API level served (V1 names are kept too)
__flexep__ = True  # marks this module as flexep's shim

__all__ = ["Buffer", "Config", "ElasticBuffer", "EPBuffer", "EPHandle", "EventHandle", "EventOverlap",
           "BufferAllocator", "BufferBase", "topk_idx_t", "get_buffer_size_hint", "get_physical_domain_size",
           "get_logical_domain_size", "get_num_allocation_alignment", "get_num_tma_alignment",
           "get_num_rdma_alignment", "destroy_all_managed_nccl_comm", "buffers", "comm", "utils"]
