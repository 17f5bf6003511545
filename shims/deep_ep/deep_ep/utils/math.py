"""``deep_ep.utils.math``, from flexep."""

from flexep.utils.math import *  # noqa: F401,F403
from flexep.utils.math import __all__  # noqa: F401
