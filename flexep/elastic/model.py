"""``ElasticMoE``: a model with :class:`~flexep.moe.MoELayer` s that follows the EP membership.

After every membership change (:class:`~flexep.elastic.ElasticEP` ``on_change``) the module is
rebuilt for the new group by the user's ``build(generation, placement)`` and its state is carried
over, collectively:

1. every member reports what it holds (which logical experts, whether it has any state);
2. a sticky EPLB placement over the new group (:func:`~flexep.elastic.coverage.plan_placement`);
3. replicated tensors (router, shared experts, anything not expert-sharded) stay where they are;
   a member without state (a joiner) receives them from the lowest-ranked member with state;
4. each expert slot is copied locally, moved from a live copy over the group, or, when every
   copy was on lost ranks, handled by the **policy**:

   * ``"rerun"`` (default): read from the last checkpoint (``checkpoint=``), so the step re-run
     on the new group equals a fault-free run (bitwise where the layer promises it,
     ``slotwise_combine=True``). Without a checkpoint a lost expert is an error.
   * ``"mask"``: DeepEP's shrink semantics: the expert is masked, its slots contribute zero and
     the other top-k weights are unchanged (no checkpoint read; outputs differ from a
     fault-free run for every token that chose a masked expert). With shrink-mode Buffers
     (``enable_shrink=True``) the failing low-latency step itself already runs masked, and
     :meth:`ElasticMoE.run` keeps its result instead of re-running it.
   * ``"renormalize"``: masked as above, the surviving top-k weights rescaled to keep their sum.

   :meth:`ElasticMoE.restore` later fills masked experts from the checkpoint and unmasks them.

All layers of the module share one placement (they are built by ``build`` with it).
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch

from ..moe.checkpoint import load as load_checkpoint
from ..moe.checkpoint import read_tensors
from ..moe.eplb import Placement
from ..moe.layer import MoELayer
from .coverage import MISSING, move_rows, plan_placement, plan_sources, slots_for
from .ep import ElasticEP
from .group import Generation

__all__ = ["ElasticMoE", "POLICIES"]

T = TypeVar("T")

POLICIES = ("rerun", "mask", "renormalize")
_EXPERT_TENSORS = ("w_gate", "w_up", "w_down")


def _layers(module: torch.nn.Module) -> dict:
    return {name: m for name, m in module.named_modules() if isinstance(m, MoELayer)}


class ElasticMoE:
    """Keeps ``module`` (built by ``build``) valid on the current membership of ``ep``.

    Args:
        ep: the :class:`ElasticEP` (register before ``ep.join()``).
        build: ``build(generation, placement) -> torch.nn.Module`` holding MoE layers on a Buffer
            over ``generation.group`` (pass ``**generation.buffer_kwargs()`` to the Buffer).
        placement: the placement of generation 0 (its redundant slot count is kept later).
        load: ``[E]`` expected tokens per expert, for placements (default uniform).
        checkpoint: a :mod:`flexep.checkpoint` directory: generation 0 loads it, and lost
            experts are read from it under the ``"rerun"`` policy.
        policy: ``"rerun"``, ``"mask"`` or ``"renormalize"`` (module docstring).

    ``module`` is None on a joiner until it is admitted.
    """

    def __init__(self, ep: ElasticEP, build: Callable[[Generation, Placement], torch.nn.Module],
                 placement: Placement, *, load: Optional[torch.Tensor] = None,
                 checkpoint: Optional[str] = None, policy: str = "rerun") -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.ep, self.build, self.policy, self.checkpoint = ep, build, policy, checkpoint
        self.num_logical = placement.num_logical
        self.redundant = placement.num_physical - placement.num_logical
        self.load = (load if load is not None else torch.ones(self.num_logical)).detach().double().cpu()
        self.placement = placement
        self.masked: frozenset = frozenset()
        self.module: Optional[torch.nn.Module] = None
        self._member = ep.member  # the identity whose state ``module`` holds
        if ep.is_member:
            self.module = self._built(ep.gen, placement)
            if checkpoint is not None:
                load_checkpoint(self.module, checkpoint)
        ep.on_change(self._adopt)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def run(self, step: Callable[[], T]) -> T:
        """:meth:`ElasticEP.run` for a step of this model, aware of shrink mode: with Buffers
        built with ``enable_shrink=True`` a lost peer is masked inside the low-latency calls
        instead of raising (DeepEP's semantics: its experts contribute zero to that step); the
        membership then changes at the end of the step. The ``"mask"`` policy keeps that step's
        result (exactly DeepEP's answer); the other policies re-run it on the new group."""
        return self.ep.run(step, lost=self.masked_peers, keep_result=self.policy == "mask")

    def masked_peers(self) -> list[int]:
        """EP ranks a shrink-mode Buffer of the module has masked (empty without shrink mode)."""
        masked: set = set()
        for layer in _layers(self.module).values() if self.module is not None else ():
            buf = layer.buffer
            if buf.enable_shrink:
                status = torch.zeros(buf.group_size, dtype=torch.int32)
                buf.low_latency_query_mask_buffer(status)
                masked |= {r for r, m in enumerate(status.tolist()) if m}
        return sorted(masked)

    def _built(self, gen: Generation, placement: Placement) -> torch.nn.Module:
        module = self.build(gen, placement)
        layers = _layers(module)
        if not layers:
            raise ValueError("build() must return a module holding at least one flexep.moe.MoELayer")
        for name, layer in layers.items():
            if layer.buffer.group is not gen.group or layer.buffer.comm.control.generation != gen.generation:
                raise ValueError(f"layer {name!r}: build() must put its Buffer on generation.group with "
                                 "**generation.buffer_kwargs() (the group and generation it was given)")
        return module

    # ---- the membership changed -------------------------------------------------------------
    def _adopt(self, gen: Generation) -> None:
        """Rebuild the module on ``gen`` and carry the state over (collective, module doc)."""
        # Ordinary tensors even when the failure happened under inference_mode.
        with torch.inference_mode(False), torch.no_grad():
            self._rebuild(gen)

    def _rebuild(self, gen: Generation) -> None:
        # A process that rejoined under a new member id starts without state: what it held
        # belongs to a generation it was excluded from.
        old = self.module if self._member == self.ep.member else None
        self._member = self.ep.member
        layers = _layers(old) if old is not None else {}
        held = None
        if old is not None:
            first = next(iter(layers.values()))
            held = [e for e in first.experts.logical_ids.tolist() if e not in self.masked]
        reports = self.ep.gather_objects(held)
        placement = plan_placement(self.load, [h or [] for h in reports],
                                   slots_for(self.num_logical, self.redundant, gen.world))
        new = self._built(gen, placement)
        if old is not None:
            new.train(old.training)
        self._replicated(old, new, reports)
        sources = plan_sources(placement, reports)
        slots = placement.physical_to_logical.tolist()
        missing = {e for e, s in zip(slots, sum(sources, [])) if s == MISSING}
        if missing and self.policy == "rerun" and self.checkpoint is None:
            raise RuntimeError(f"experts {sorted(missing)} lost every copy and there is no checkpoint to "
                               "restore them from; pass ElasticMoE(checkpoint=...) or a mask policy")
        for name, layer in _layers(new).items():
            self._experts(name, layers.get(name), layer, placement, sources, missing)
        self.module, self.placement = new, placement
        self.masked = frozenset() if self.policy == "rerun" else frozenset(missing)
        self._apply_mask()

    def _replicated(self, old, new, reports: list) -> None:
        """Copy the non-expert state; members without state receive the donor's bytes."""
        state = [(k, v) for k, v in new.state_dict().items() if not _is_expert(k)]
        donor = min(r for r, h in enumerate(reports) if h is not None)
        needy = [r for r, h in enumerate(reports) if h is None]
        rank = self.ep.rank
        nbytes = sum(v.numel() * v.element_size() for _, v in state)
        send = torch.empty(0, nbytes, dtype=torch.uint8)
        if old is not None:
            mine = old.state_dict()
            with torch.no_grad():
                for k, v in state:
                    v.copy_(mine[k])
            if rank == donor and needy:
                flat = torch.cat([v.detach().reshape(-1).view(torch.uint8) for _, v in state])
                send = flat.view(1, -1).expand(len(needy), -1).contiguous()
        counts = [1 if rank == donor and r in needy else 0 for r in range(self.ep.world)]
        recv = torch.empty(int(rank in needy), nbytes, dtype=torch.uint8)
        self.ep.exchange("replicated", [send], [recv],
                         counts, [int(rank in needy and r == donor) for r in range(self.ep.world)])
        if rank in needy:
            offset = 0
            with torch.no_grad():
                for _, v in state:
                    n = v.numel() * v.element_size()
                    v.copy_(recv[0, offset:offset + n].view(v.dtype).view(v.shape))
                    offset += n

    def _experts(self, name: str, old: Optional[MoELayer], new: MoELayer, placement: Placement,
                 sources: list, missing: set) -> None:
        """Fill ``new``'s expert slots: local copies, moved rows, checkpoint rows or masked."""
        params = [getattr(new.experts, t) for t in _EXPERT_TENSORS]
        shapes = [p.shape[1:] for p in params]
        width = sum(s.numel() for s in shapes)
        held, offered = [], []
        if old is not None:
            flat = torch.cat([getattr(old.experts, t).detach().flatten(1) for t in _EXPERT_TENSORS], 1)
            for slot, e in enumerate(old.experts.logical_ids.tolist()):
                if e not in self.masked and e not in held:
                    held.append(e)
                    offered.append(slot)
            rows = flat[offered]
        else:
            rows = params[0].new_empty(0, width)
        wanted = placement.physical_to_logical.view(placement.num_ranks, -1).tolist()
        rows = move_rows(self.ep.control, wanted, sources, held, rows)
        with torch.no_grad():
            for j, e in enumerate(wanted[self.ep.rank]):
                if j in rows:
                    parts = rows[j].split([s.numel() for s in shapes])
                    for p, part, shape in zip(params, parts, shapes):
                        p[j].copy_(part.view(shape))
                elif e in missing and self.policy == "rerun":
                    self._from_checkpoint(name, e, params, j)

    def _from_checkpoint(self, name: str, expert: int, params: list, slot: int) -> None:
        prefix = f"{name}.experts.{expert}" if name else f"experts.{expert}"
        found = read_tensors(self.checkpoint, [f"{prefix}.{t}" for t in _EXPERT_TENSORS])
        for p, t in zip(params, _EXPERT_TENSORS):
            p[slot].copy_(found[f"{prefix}.{t}"])

    def _apply_mask(self) -> None:
        for layer in _layers(self.module).values():
            layer.set_unavailable(sorted(self.masked), renormalize=self.policy == "renormalize")

    # ---- back to full coverage --------------------------------------------------------------
    def restore(self) -> list[int]:
        """Fill masked experts from the checkpoint and unmask them (every member calls it; no
        communication, each rank reads its own slots). Returns the experts restored."""
        if not self.masked:
            return []
        if self.checkpoint is None:
            raise RuntimeError("restore() needs ElasticMoE(checkpoint=...)")
        for name, layer in _layers(self.module).items():
            params = [getattr(layer.experts, t) for t in _EXPERT_TENSORS]
            with torch.no_grad():
                for slot, e in enumerate(layer.experts.logical_ids.tolist()):
                    if e in self.masked:
                        self._from_checkpoint(name, e, params, slot)
        restored, self.masked = sorted(self.masked), frozenset()
        self._apply_mask()
        return restored


def _is_expert(key: str) -> bool:
    return any(key.endswith(f"experts.{t}") for t in _EXPERT_TENSORS)
