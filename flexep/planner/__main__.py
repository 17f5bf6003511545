"""``python -m flexep.planner``: same as ``flexep plan``."""

import sys

from .cli import main

sys.exit(main())
