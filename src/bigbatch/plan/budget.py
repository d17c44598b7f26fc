"""Memory budgets: parse "6GiB"-style sizes, and the default budget of this machine."""

from __future__ import annotations

import re

from bigbatch.errors import UsageError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DEFAULT_FRACTION = 0.8  # of what is available now: leaves room for the OS and other processes


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


def available_bytes(device_type: str, device_index: int | None = None) -> int:
    """Memory a new process could use now: MemAvailable on CPU, free memory on a CUDA device."""
    if device_type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device_index)
        return int(free)
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise UsageError("cannot read MemAvailable from /proc/meminfo: set batch.memory_budget")


def resolve_budget(value: int | str, device_type: str, device_index: int | None = None,
                   ranks_per_node: int = 1) -> int:
    """One rank's budget: `value`, or by default a fraction of what is free now. A GPU is one
    rank's own; a CPU node's memory is shared by its `ranks_per_node` ranks, so each gets its
    share. An explicit `value` is per rank, as it is written."""
    budget = parse_bytes(value)
    if budget == 0:
        budget = int(DEFAULT_FRACTION * available_bytes(device_type, device_index))
        if device_type != "cuda":
            budget //= max(1, ranks_per_node)
    return budget
