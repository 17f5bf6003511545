"""Elastic expert parallelism: keep running after a lost rank, admit new ones, lose no token.

* :mod:`~flexep.elastic.membership` — generations and member lists agreed through a store that
  outlives any worker; stale members are refused (:class:`~flexep.errors.StaleGenerationError`);
* :mod:`~flexep.elastic.group` — one new process group per generation;
* :mod:`~flexep.elastic.ep` — :class:`ElasticEP`: run a step, recover from a peer failure, re-run;
* :mod:`~flexep.elastic.coverage` — sticky EPLB placement over the new group and weight moves;
* :mod:`~flexep.elastic.model` — :class:`ElasticMoE`: the model follows the membership, with the
  ``rerun``, ``mask`` and ``renormalize`` policies;
* :mod:`~flexep.elastic.training` — optimizer-inclusive checkpoints that load at any EP size;
* :mod:`~flexep.elastic.streams` — :class:`TokenStreams`: served tokens in the store, first write wins.

``docs/elastic.md`` describes the state machine, the policies and their measured costs.
"""

from .coverage import plan_placement, plan_sources, slots_for
from .ep import Change, ElasticEP, is_failure
from .group import Generation
from .membership import Membership, MembershipStore, job_store
from .model import POLICIES, ElasticMoE
from .streams import TokenStreams
from .training import latest_step, load_state, save_state, training_placement

__all__ = ["ElasticEP", "ElasticMoE", "Change", "Generation", "Membership", "MembershipStore", "POLICIES",
           "job_store", "is_failure", "plan_placement", "plan_sources", "slots_for", "training_placement",
           "save_state", "load_state", "latest_step", "TokenStreams"]
