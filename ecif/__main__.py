"""``python -m ecif``: the same command line as ``ecif``."""

import sys

from ecif.cli import main

sys.exit(main())
