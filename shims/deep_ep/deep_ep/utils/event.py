"""``deep_ep.utils.event``, from flexep."""

from flexep.utils.event import *  # noqa: F401,F403
from flexep.utils.event import __all__  # noqa: F401
