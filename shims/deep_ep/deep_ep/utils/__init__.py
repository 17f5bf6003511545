"""``deep_ep.utils``: ``EventHandle`` and ``EventOverlap`` (both, as V1 callers import them) and
DeepEP's test helpers, from flexep."""

from flexep.utils import *  # noqa: F401,F403
from flexep.utils import __all__  # noqa: F401

from . import envs, event, gate, math, refs, testing  # noqa: F401,E402
