"""``python -m hub`` is ``edge-hub``."""

import sys

from hub.cli import main

sys.exit(main())
