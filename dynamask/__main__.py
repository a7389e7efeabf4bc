"""``python -m dynamask ...`` is the ``dynamask`` command."""

import sys

from dynamask.cli import main

sys.exit(main())
