"""``python -m streamconv`` is the ``streamconv`` command."""

import sys

from .cli import main

sys.exit(main())
