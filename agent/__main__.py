"""``python -m spotguard.agent``: the same as the ``spotguard`` command."""

import sys

from spotguard.agent.cli import main

sys.exit(main())
