"""Memory budgets: the default budget of this machine (sizes are parsed in config/units.py)."""

from __future__ import annotations

from bigbatch.config.units import parse_bytes
from bigbatch.errors import UsageError

DEFAULT_FRACTION = 0.8  # of what is available now: leaves room for the OS and other processes


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
