"""Parsing and printing byte sizes (``2GiB``, ``1500MB``, ``123456``)."""

from __future__ import annotations

import re

from .errors import FlagError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_size(text: str, flag: str = "--max-memory") -> int:
    """Return the number of bytes in ``text``; decimal (MB) and binary (MiB) units."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise FlagError(
            f"{flag} {text!r} is not a size; write e.g. 2GiB, 1500MB or a plain number of bytes"
        )
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise FlagError(f"{flag} {text!r} must be a positive size")
    return int(value)


def human(n: float) -> str:
    """Binary-unit rendering used in every report (``1.50 GiB``)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover
