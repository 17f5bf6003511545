"""Cluster planner: predicted dispatch/combine time and bandwidth before owning the cluster.

``flexep plan`` (or ``python -m flexep.planner``) and :func:`plan` predict, for a hardware
description, an implementation profile, a model shape and a routing, the time of every phase of
the normal flat, normal hierarchical and low-latency modes over a sweep of EP sizes.

* :mod:`~flexep.planner.hardware`: what the datasheet says (links, NICs, scale-up domain, who
  posts RDMA work, the fabric); presets in :mod:`~flexep.planner.presets`.
* :mod:`~flexep.planner.profile`: what an implementation costs on any hardware (DeepEP V1,
  DeepEP V2, flexep over NCCL); profiles in :mod:`~flexep.planner.profiles`.
* :mod:`~flexep.planner.traffic`: bytes, rows and messages per rank from flexep's accounting.
* :mod:`~flexep.planner.model`: the time as additive plus overlapped terms, with their kinds.
* :mod:`~flexep.planner.calibration`: the fit to DeepEP's tables and its cross-validation;
  :mod:`~flexep.planner.heldout`: other systems' published results, predicted, not fitted.
"""

from .hardware import Accelerator, Fabric, Hardware, IntraLink, Nic, ScaleUp
from .plan import Prediction, plan, predict
from .presets import get_preset, load_preset, preset_names
from .profile import Profile, get_profile, profile_names
from .routing import Routing
from .workload import ModelShape

__all__ = ["Hardware", "Accelerator", "ScaleUp", "IntraLink", "Nic", "Fabric", "Profile", "ModelShape",
           "Routing", "Prediction", "plan", "predict", "get_preset", "load_preset", "preset_names",
           "get_profile", "profile_names"]
