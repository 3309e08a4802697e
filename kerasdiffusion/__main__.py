"""``python -m kerasdiffusion``: the same as the ``kerasdiffusion`` command (see `kerasdiffusion.cli`)."""

import sys

from kerasdiffusion.cli import main

if __name__ == "__main__":
    sys.exit(main())
