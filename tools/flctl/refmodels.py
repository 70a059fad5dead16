"""The reference models moved to :mod:`flctl.model.refmodels`; this name stays for existing callers and is the
very same module object (so patching one patches the other)."""

import sys

from flctl.model import refmodels

sys.modules[__name__] = refmodels
