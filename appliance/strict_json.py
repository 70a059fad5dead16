"""JSON text that every reader accepts (RFC 8259), for what the tools print and the aggregator answers.

Python's ``json.dumps`` prints inf and nan as ``Infinity`` and ``NaN``, which RFC 8259 has no room for: jq, a
browser's ``JSON.parse`` and Go's ``encoding/json`` refuse the whole document. One rule per kind of number
(docs/api.md, "Numbers in JSON"):

- a number fl-edge computes or checks itself (an epsilon, a mean of finite metrics, a time, a setting) is never
  inf or nan: :func:`dumps` refuses one (ValueError, an error on the caller's side) rather than print a document
  nobody can read;
- a number shown as it was found (a model package's fields, another process's answer, a damaged record) may be
  anything: :func:`finite_or_text` writes each inf or nan as the text ``"Infinity"``, ``"-Infinity"`` or
  ``"NaN"`` (protobuf's JSON mapping spells them so, and Python and JavaScript print them so unquoted), so a
  reader still sees what it was, and a script tells it from a number by its type.

This module is shared by the aggregator and flctl; the agent itself prints no JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

#: The text a non-finite number is written as (see :func:`finite_or_text`).
NON_FINITE_TEXT = ("Infinity", "-Infinity", "NaN")


def dumps(value: Any, **options: Any) -> str:
    """``json.dumps(value, **options)`` that refuses inf and nan (ValueError) instead of printing ``Infinity`` or
    ``NaN``: for documents whose numbers can never legitimately be non-finite."""
    return json.dumps(value, allow_nan=False, **options)


def dumps_as_found(value: Any, **options: Any) -> str:
    """:func:`dumps` of ``value``, or when it holds an inf or nan, of :func:`finite_or_text` of it: for documents
    that show numbers as they were found. The walk costs nothing when every number is finite."""
    try:
        return dumps(value, **options)
    except ValueError:
        return dumps(finite_or_text(value), **options)


def finite_or_text(value: Any) -> Any:
    """``value`` (nested dicts, lists and tuples of JSON values, numpy scalars included) with each inf, -inf or nan
    replaced by the text ``"Infinity"``, ``"-Infinity"`` or ``"NaN"``, and numpy floats made Python floats."""
    if isinstance(value, float | np.floating):
        number = float(value)
        if math.isnan(number):
            return "NaN"
        if math.isinf(number):
            return "Infinity" if number > 0 else "-Infinity"
        return number
    if isinstance(value, dict):
        return {key: finite_or_text(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_text(item) for item in value]
    return value


def found_number(value: Any) -> Any:
    """A number field as :func:`dumps_as_found` wrote it, for a reader that formats or computes with it: the text
    ``"Infinity"``, ``"-Infinity"`` or ``"NaN"`` as the float it stands for, anything else as it is (a reader of
    such a document, like ``fl-aggregator status --url``, prints ``inf`` as it did before the text)."""
    return float(value) if isinstance(value, str) and value in NON_FINITE_TEXT else value
