"""``python tests/slow_cli.py VERB ...``: the ``ecif`` command line with every embedding batch
held 0.25 s, so a test can kill or interrupt ``ecif embed`` mid-run (tests/test_data_resume.py).

The hold is a patch of the batch encoder in this process only; the library has no test hook.
"""

import sys
import time

from ecif.cli import main
from ecif.data import embed_stream

_encode = embed_stream._encode


def _held_encode(*args, **kwargs):
    time.sleep(0.25)
    return _encode(*args, **kwargs)


if __name__ == "__main__":
    embed_stream._encode = _held_encode
    sys.exit(main(sys.argv[1:]))
