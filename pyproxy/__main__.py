"""``python -m pyproxy`` — the same as the ``pyproxy`` command."""

import sys

from pyproxy.cli import main

sys.exit(main())
