"""``python -m flexep`` is the ``flexep`` command."""

import sys

from .cli import main

sys.exit(main())
