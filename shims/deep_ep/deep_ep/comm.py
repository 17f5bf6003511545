"""``deep_ep.comm`` (DeepEP V2.5), from flexep."""

from flexep.deepep.comm_api import *  # noqa: F401,F403
from flexep.deepep.comm_api import __all__  # noqa: F401
