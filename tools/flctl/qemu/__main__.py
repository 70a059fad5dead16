"""``python -m flctl.qemu run``: the same as ``flctl qemu run``."""

import sys

from .cli import main

sys.exit(main())
