"""Sizes in bytes: "6GiB"-style strings in config values, and back for people."""

from __future__ import annotations

import re

from bigbatch.errors import UsageError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str, key: str = "batch.memory_budget") -> int:
    """An int of bytes, or a string like "6GiB", "512MiB", "1.5GB"; 0 means the default."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise UsageError(f"{key} = {value!r} is invalid: a byte count >= 0 (0 = default)")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in UNITS:
        raise UsageError(f"{key} = {value!r} is invalid: bytes as an integer or a string such "
                         "as \"6GiB\", \"512MiB\" or \"1.5GB\"")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def format_bytes(num_bytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes:.0f} B"
