"""``deep_ep.utils.envs``, from flexep."""

from flexep.utils.envs import *  # noqa: F401,F403
from flexep.utils.envs import __all__  # noqa: F401
