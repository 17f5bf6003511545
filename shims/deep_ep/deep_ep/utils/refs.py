"""``deep_ep.utils.refs``, from flexep."""

from flexep.utils.refs import *  # noqa: F401,F403
from flexep.utils.refs import __all__  # noqa: F401
