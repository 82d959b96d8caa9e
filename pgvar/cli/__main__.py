"""``python -m pgvar.cli``: the ``pgvar`` command without the console script."""

import sys

from pgvar.cli import main

sys.exit(main())
