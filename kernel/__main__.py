"""``python -m kernel``: see ``kernel.cli``."""

import sys

from .cli import main

sys.exit(main())
