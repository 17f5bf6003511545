"""``deep_ep.utils.testing``, from flexep."""

from flexep.utils.testing import *  # noqa: F401,F403
from flexep.utils.testing import __all__  # noqa: F401
