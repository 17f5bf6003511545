"""Elastic EP training: checkpoints of model *and* optimizer that load at any EP size.

When a rank is lost during training its experts and their optimizer moments are gone, so the
survivors continue from the last checkpoint at the smaller EP size, without restarting:

    step = load_state(model, optimizer, root)      # after ElasticEP.recover() and a rebuild

A training checkpoint is a directory ``root/step-<n>/`` with

* ``model/``: :func:`flexep.checkpoint.save` of the module (per logical expert);
* ``optim-<name>/``: the optimizer's per-parameter tensor state ``<name>`` (Adam's ``exp_avg``,
  ``exp_avg_sq``) in the same per-expert format: the state tensors stand in for the parameters
  while the module is saved, so they re-shard exactly like the weights;
* ``meta.json``: the step and the optimizer's scalar state (equal for every parameter);

and ``root/latest`` names the newest complete one (replaced atomically after every rank wrote).
Optimizers whose state is tensors shaped like their parameter plus equal scalars (SGD with
momentum, Adam, AdamW) are supported.

At an EP size that does not divide the experts, the placement has replicas
(:func:`training_placement`); :func:`flexep.moe.sync_replica_grads` after each backward gives
every copy the sum of the copies' gradients, so they take the same step.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import torch
import torch.distributed as dist

from ..moe import checkpoint
from ..moe.eplb import Placement, global_placement
from .coverage import slots_for

__all__ = ["training_placement", "save_state", "load_state", "latest_step"]


def training_placement(num_experts: int, world: int) -> Placement:
    """One replica per expert when ``world`` divides ``num_experts`` (DeepEP's layout), else the
    fewest slots that do, the extra ones replicas of the lowest ids. Deterministic, so a resumed
    run and a run started at this size agree. Example: 16 experts on 3 ranks -> 18 slots."""
    if num_experts % world == 0:
        return Placement.identity(num_experts, world)
    return global_placement(torch.ones(num_experts), slots_for(num_experts, 0, world), world)


@contextlib.contextmanager
def _standing_in(module: torch.nn.Module, tensors: dict):
    """Let ``tensors[param]`` stand in for each parameter's data while the block runs."""
    saved = {p: p.data for p in tensors}
    try:
        for p, t in tensors.items():
            p.data = t
        yield
    finally:
        for p, data in saved.items():
            p.data = data


def _tensor_state(optimizer: torch.optim.Optimizer) -> tuple[list, dict]:
    names, scalars = set(), {}
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim() > 0:
                names.add(k)
            else:
                value = float(v)
                if scalars.setdefault(k, value) != value:
                    raise ValueError(f"optimizer state {k!r} differs between parameters; only equal "
                                     "scalars are supported")
    return sorted(names), scalars


def save_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, root: str, step: int,
               group: dist.ProcessGroup) -> str:
    """Write the training state after ``step`` steps (collective over ``group``); returns its
    directory. ``root/latest`` points at it once every rank has written."""
    path = os.path.join(root, f"step-{step:06d}")
    checkpoint.save(module, os.path.join(path, "model"), group)
    names, scalars = _tensor_state(optimizer)
    params = [p for p in module.parameters() if p in optimizer.state]
    for name in names:
        with _standing_in(module, {p: optimizer.state[p][name] for p in params}):
            checkpoint.save(module, os.path.join(path, f"optim-{name}"), group)
    if dist.get_rank(group) == 0:
        with open(os.path.join(path, "meta.json"), "w") as f:
            json.dump(dict(step=step, tensors=names, scalars=scalars), f)
        tmp = os.path.join(root, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(os.path.basename(path))
        os.replace(tmp, os.path.join(root, "latest"))
    dist.barrier(group=group)
    return path


def latest_step(root: str) -> Optional[str]:
    """The newest complete checkpoint directory under ``root`` (None if there is none)."""
    file = os.path.join(root, "latest")
    if not os.path.exists(file):
        return None
    with open(file) as f:
        return os.path.join(root, f.read().strip())


def load_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str) -> int:
    """Load model and optimizer state from ``path`` (a ``step-<n>`` directory, or a root with a
    ``latest``) into a module at any EP size; returns the step to continue from. No
    communication: each rank reads the experts it holds."""
    if os.path.exists(os.path.join(path, "latest")):
        path = latest_step(path)
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    checkpoint.load(module, os.path.join(path, "model"))
    params = list(module.parameters())
    for name in meta["tensors"]:
        tensors = {p: torch.zeros_like(p) for p in params}
        with _standing_in(module, tensors):
            checkpoint.load(module, os.path.join(path, f"optim-{name}"))
        for p, t in tensors.items():
            optimizer.state[p][name] = t
    for p in params:
        for k, v in meta["scalars"].items():
            optimizer.state[p][k] = torch.tensor(v)
    return int(meta["step"])
