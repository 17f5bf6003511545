"""``deep_ep.utils.gate``, from flexep."""

from flexep.utils.gate import *  # noqa: F401,F403
from flexep.utils.gate import __all__  # noqa: F401
