"""Resolve ``PACKAGE.MODULE:NAME`` references given on the command line (model factories, losses)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from flctl.model.errors import ExportError


def load_object(ref: str, what: str) -> Any:
    """The object ``NAME`` (dots allowed: ``Class.method``) of module ``PACKAGE.MODULE``.

    The current directory is searched first, as ``python -m`` does, so a ``models.py`` beside the command works.
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ExportError(f"{what} {ref!r}: expected PACKAGE.MODULE:NAME")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ExportError(f"{what} {ref!r}: cannot import {module_name}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ExportError(f"{what} {ref!r}: {module_name} has no {attr}")
        obj = getattr(obj, part)
    return obj
