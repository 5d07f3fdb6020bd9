"""DICOM values as numbers: the one parser every reader of headers and functional groups shares (a
leaf module, so that headers and multi-frame functional groups import it without importing each other)."""

from __future__ import annotations

import math
from typing import Any


def numbers(value: Any, n: int) -> tuple[float, ...] | None:
    """``n`` finite floats from a DICOM value (one number or several), else None."""
    try:
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            value = [value]
        values = [float(v) for v in value]
    except (TypeError, ValueError, OverflowError):
        return None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        return None
    return tuple(values)
