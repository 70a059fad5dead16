"""``python -m flctl.image build``: the same as ``flctl image build``."""

import sys

from .cli import main

sys.exit(main())
