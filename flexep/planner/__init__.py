"""Cluster planner: predicted dispatch/combine time and bandwidth before owning the cluster.

``flexep plan`` (or ``python -m flexep.planner``) and :func:`plan` predict, for a hardware
preset, a model shape and a routing, the time of every phase of the normal flat, normal
hierarchical and low-latency modes over a sweep of EP sizes and channel counts. Byte counts
come from flexep's own accounting on sampled routings; times from the link model in
:mod:`flexep.planner.linkmodel`; spine collisions on RoCE from :mod:`flexep.planner.ecmp`.
:mod:`flexep.planner.calibration` checks the whole against DeepEP's published tables.
"""

from .hardware import Engine, Fabric, Hardware, IntraLink, Nic
from .plan import Prediction, plan, predict
from .presets import get_preset, preset_names
from .routing import Routing
from .workload import ModelShape

__all__ = ["Hardware", "IntraLink", "Nic", "Fabric", "Engine", "ModelShape", "Routing",
           "Prediction", "plan", "predict", "get_preset", "preset_names"]
