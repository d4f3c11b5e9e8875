"""Byte counts as people write them ("20GiB", "1.5 GB") and as people read them ("1.2 GiB")."""

from __future__ import annotations

import re

from spotguard.errors import ConfigError

__all__ = ["human_size", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """``"20GiB"``, ``"1.5 GB"``, ``"1048576"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"size {text!r}: use a number with an optional unit, e.g. 20GiB or 500MB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ConfigError(f"size {text!r} must be more than 0 bytes")
    return size


def human_size(size: float) -> str:
    """``512 B``, ``1.5 KiB``, ... ``2.0 TiB``: binary units, one decimal above bytes."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
