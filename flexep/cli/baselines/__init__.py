"""Framework token dispatchers as baselines for ``flexep bench --baselines``.

In the same run, on the same tokens and routing, each baseline is driven as its framework's MoE
layer drives it and checked against a single-process reference before it is timed:

* torchtitan's ``AllToAllTokenDispatcher`` (:mod:`.torchtitan_a2a`),
* Megatron-Core's ``MoEAlltoAllTokenDispatcher`` (:mod:`.megatron_a2a`),
* and flexep itself as its ``MoELayer`` drives it (:mod:`.flexep_layer`), so that all three are
  timed with the same boundaries (routing metadata and reorder to experts in dispatch, the
  weighting of expert outputs in combine).

The frameworks are optional (``docs/benchmarks.md#framework-dispatchers`` has the install
recipe); a missing one is skipped with the reason and the command that installs it. Nothing here
imports them, or changes any process-wide state, until a :class:`Suite` is built in a bench
worker.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ...comm.objects import all_gather_object
from ...deepep.buffer import Buffer
from . import megatron_a2a, torchtitan_a2a
from .availability import DOCS, Framework
from .flexep_layer import LABEL as FLEXEP_LABEL
from .flexep_layer import FlexepLayerDriver
from .harness import Driver, verify

__all__ = ["FRAMEWORKS", "Suite", "availability", "DOCS"]

# name -> module with FRAMEWORK, is_available() and its Driver class; in the order they run
FRAMEWORKS = {"torchtitan": (torchtitan_a2a, torchtitan_a2a.TorchtitanDriver),
              "megatron": (megatron_a2a, megatron_a2a.MegatronDriver)}
FLEXEP = "flexep_layer"


def availability() -> dict:
    """``{name: (ok, version or reason)}`` for every framework; imports nothing."""
    return {name: mod.is_available() for name, (mod, _) in FRAMEWORKS.items()}


class Suite:
    """The baselines of one bench run on this rank (collective: every rank builds one).

    Building it checks which frameworks every rank can import, builds their drivers and checks one
    pass of each against the reference. A framework that is missing anywhere is skipped; one that
    fails to build or fails its check is reported as failed; neither stops the bench.
    :meth:`step` then runs one timed pass of each, after the bench's own phases of the iteration.
    """

    def __init__(self, buffer: Buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 experts: int, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self._device = x.device if x.device.type != "cpu" else None
        self.drivers: dict = {}
        self.info: dict = {}
        args = (x, topk_idx, topk_weights, experts)
        self._add(FLEXEP, FLEXEP_LABEL, None, lambda: FlexepLayerDriver(buffer, *args, group=group))
        for name, (mod, driver_cls) in FRAMEWORKS.items():
            fw: Framework = mod.FRAMEWORK
            ok, why = self._agree(mod.is_available)
            if not ok:
                self.info[name] = dict(label=fw.label, status="skipped", reason=why, install=fw.install)
                continue
            ok, err = self._agree(lambda m=mod: _try(m.import_framework))  # shims included
            if not ok:
                self.info[name] = dict(label=fw.label, status="skipped", install=fw.install,
                                       reason=f"{fw.dist} {why} does not import: {err}")
                continue
            self._add(name, fw.label, why, lambda c=driver_cls: c(*args, group=group))

    def _agree(self, fn) -> tuple:
        """``fn() -> (ok, text)`` on every rank; ``(True, text)`` only if it holds on all of them,
        else the first failing rank's ``(False, text)``."""
        results = all_gather_object(self.group, fn(), self._device)
        return next((r for r in results if not r[0]), results[0])

    def _add(self, name: str, label: str, version: Optional[str], build) -> None:
        def check() -> tuple:
            driver = build()
            _, first = driver.step()
            return driver, verify(label, first, driver.x, driver.topk_idx, driver.topk_weights,
                                  driver.experts, self.group)
        driver, checked, error = None, None, ""
        try:
            driver, checked = check()
        except Exception as exc:  # noqa: BLE001 - reported in the table, the bench goes on
            error = f"{type(exc).__name__}: {exc}"
        ok, error = self._agree(lambda: (not error, error))
        if not ok:
            self.info[name] = dict(label=label, status="failed", version=version, reason=error)
            return
        self.drivers[name] = driver
        self.info[name] = dict(label=label, status="ok", version=version, check=checked)

    def step(self) -> dict:
        """One timed pass of each baseline: ``{"<name> dispatch": (wall, cpu), "<name> combine":
        ...}``, as :func:`flexep.cli.common.timed` samples."""
        sample = {}
        driver: Driver
        for name, driver in self.drivers.items():
            times, _ = driver.step()
            for phase, t in times.items():
                sample[f"{name} {phase}"] = t
        return sample


def _try(fn) -> tuple:
    try:
        fn()
        return True, ""
    except Exception as exc:  # noqa: BLE001 - the reason a framework is skipped
        return False, f"{type(exc).__name__}: {exc}"
