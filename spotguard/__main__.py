"""``python -m spotguard``: the same as the ``spotguard`` command."""

import sys

from spotguard.cli import main

sys.exit(main())
