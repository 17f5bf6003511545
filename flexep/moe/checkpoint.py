"""Expert-parallel checkpoints that load at any EP size and any EPLB placement.

Train on N ranks, serve on M: expert weights are stored per *logical* expert, so where an
expert lived when it was saved does not matter when it is loaded. A checkpoint is a directory::

    index.json                       {"format": "flexep-moe/1", "weight_map": {key: file}, ...}
    replicated.pt                    router, bias, shared experts, anything not expert-sharded
    experts-00002-of-00004.pt        the experts rank 2 of 4 held

Keys are the module's ``state_dict`` names, except that each expert tensor ``[L, ...]`` of a
:class:`~flexep.moe.MoELayer` is split into one ``[...]`` tensor per logical expert:
``<layer>.experts.w_gate`` becomes ``<layer>.experts.<logical id>.w_gate`` (like Hugging Face
DeepSeek-V3 checkpoints, ``...experts.<id>.gate_proj``). Files are ordinary ``torch.save``
dicts of tensors; :func:`consolidate` reads them all back as one plain state dict.

:func:`save` is collective over the EP group; :func:`load` reads only the files holding this
rank's experts (memory-mapped) and needs no communication. Both assume every rank sees the
directory (a shared or local file system). Loading copies tensors bit for bit.

Shape legend: L local expert slots, E logical experts, W ranks.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.distributed as dist

from ..comm.objects import all_gather_object
from .layer import MoELayer

__all__ = ["save", "load", "consolidate", "local_state_dict", "read_tensors"]

FORMAT = "flexep-moe/1"
_EXPERT_TENSORS = ("w_gate", "w_up", "w_down")


def _moe_layers(module: torch.nn.Module) -> dict[str, MoELayer]:
    return {name: m for name, m in module.named_modules() if isinstance(m, MoELayer)}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def local_state_dict(module: torch.nn.Module, rank: int) -> tuple[dict, dict]:
    """This rank's share of the checkpoint: ``(replicated, experts)`` dicts of tensors.

    ``experts`` holds the logical experts whose *first* replica lives on ``rank`` (so each is
    saved exactly once), keyed ``<layer>.experts.<id>.<tensor>``. ``replicated`` holds every
    other ``state_dict`` entry.
    """
    layers = _moe_layers(module)
    sharded = {_join(_join(name, "experts"), t) for name in layers for t in _EXPERT_TENSORS}
    # Host copies: a checkpoint written on one device type loads on any other (or none).
    replicated = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()
                  if k not in sharded}
    experts = {}
    for name, layer in layers.items():
        placement = layer.placement
        first_slot = placement.logical_to_physical[:, 0]
        for slot, logical in enumerate(layer.experts.logical_ids.tolist()):
            global_slot = rank * placement.experts_per_rank + slot
            if int(first_slot[logical]) != global_slot:
                continue  # another replica of this expert saves it
            for t in _EXPERT_TENSORS:
                key = _join(name, f"experts.{logical}.{t}")
                experts[key] = getattr(layer.experts, t)[slot].detach().to("cpu", copy=True)
    return replicated, experts


def save(module: torch.nn.Module, path: str, group: Optional[dist.ProcessGroup] = None) -> None:
    """Write ``module`` (holding :class:`MoELayer` s over ``group``) to directory ``path``.

    Collective over ``group`` (default: the EP group of the module's MoE layers). Rank 0 writes
    the replicated tensors and the index; every rank writes its experts.
    """
    groups = {id(m.buffer.group): m.buffer.group for m in _moe_layers(module).values()}
    if group is None:
        if len(groups) > 1:
            raise ValueError(f"the module's MoE layers use {len(groups)} different EP groups; "
                             "pass group= explicitly")
        group = next(iter(groups.values()), None)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    os.makedirs(path, exist_ok=True)
    replicated, experts = local_state_dict(module, rank)
    shard = f"experts-{rank:05d}-of-{world:05d}.pt"
    torch.save(experts, os.path.join(path, shard))
    keys = all_gather_object(_host_group(module, group), (shard, sorted(experts)))
    if rank == 0:
        torch.save(replicated, os.path.join(path, "replicated.pt"))
        weight_map = {k: "replicated.pt" for k in sorted(replicated)}
        for file, names in keys:
            weight_map.update({k: file for k in names})
        layers = {name: dict(num_experts=m.config.num_experts, hidden=m.config.hidden,
                             intermediate=m.config.intermediate)
                  for name, m in _moe_layers(module).items()}
        index = dict(format=FORMAT, saved_ep_size=world, moe_layers=layers, weight_map=weight_map)
        tmp = os.path.join(path, "index.json.tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(path, "index.json"))  # the index appears complete or not at all
    dist.barrier(group=group)


def _host_group(module: torch.nn.Module, group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A group over the same ranks that moves CPU tensors (the layers' control side group when
    the EP group is accelerator-only, as NCCL and HCCL groups are)."""
    for layer in _moe_layers(module).values():
        comm = layer.buffer.comm
        if comm.group is group and comm.host_group is not None:
            return comm.host_group
    return group


def _read_index(path: str) -> dict:
    file = os.path.join(path, "index.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path} is not a flexep checkpoint: {file} is missing")
    with open(file) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"{file}: format {index.get('format')!r} is not supported, expected {FORMAT!r}")
    return index


class _Files:
    """Lazily opened checkpoint files (memory-mapped), each read at most once."""

    def __init__(self, path: str) -> None:
        self.path, self.open = path, {}

    def get(self, file: str, key: str) -> torch.Tensor:
        if file not in self.open:
            self.open[file] = torch.load(os.path.join(self.path, file), mmap=True, weights_only=True,
                                         map_location="cpu")
        return self.open[file][key]


def load(module: torch.nn.Module, path: str) -> None:
    """Load a checkpoint written by :func:`save` at any EP size into ``module``.

    Each expert slot of each :class:`MoELayer` receives its logical expert (replicas get
    copies); replicated tensors are copied as they are. Raises ``KeyError`` for missing keys and
    ``ValueError`` for shape or dtype mismatches, naming the key.
    """
    index = _read_index(path)
    weight_map, files = index["weight_map"], _Files(path)

    def fetch(key: str, like: torch.Tensor) -> torch.Tensor:
        if key not in weight_map:
            raise KeyError(f"{key} is not in the checkpoint at {path}")
        t = files.get(weight_map[key], key)
        if t.shape != like.shape or t.dtype != like.dtype:
            raise ValueError(f"{key}: checkpoint has {t.dtype} {tuple(t.shape)}, the module expects "
                             f"{like.dtype} {tuple(like.shape)}")
        return t

    layers = _moe_layers(module)
    sharded = {_join(_join(name, "experts"), t) for name in layers for t in _EXPERT_TENSORS}
    with torch.no_grad():
        state = module.state_dict(keep_vars=True)
        for key, target in state.items():
            if key not in sharded:
                target.copy_(fetch(key, target))
        for name, layer in layers.items():
            for t in _EXPERT_TENSORS:
                param = getattr(layer.experts, t)
                for slot, logical in enumerate(layer.experts.logical_ids.tolist()):
                    param[slot].copy_(fetch(_join(name, f"experts.{logical}.{t}"), param[slot]))


def consolidate(path: str) -> dict:
    """Every tensor of the checkpoint in one plain state dict (per-expert keys), for inspection,
    conversion or single-process use."""
    index = _read_index(path)
    files = _Files(path)
    return {key: files.get(file, key).clone() for key, file in sorted(index["weight_map"].items())}


def read_tensors(path: str, keys) -> dict:
    """The checkpoint tensors named ``keys`` (e.g. one lost expert's
    ``<layer>.experts.<id>.w_gate``), read from only the files that hold them. ``KeyError``
    names a missing key."""
    weight_map, files = _read_index(path)["weight_map"], _Files(path)
    missing = [k for k in keys if k not in weight_map]
    if missing:
        raise KeyError(f"{missing} not in the checkpoint at {path}")
    return {k: files.get(weight_map[k], k).clone() for k in keys}
