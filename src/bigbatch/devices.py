"""What the device can do, asked once for every room: whether it multiplies bf16 natively
(precision.dtype = "auto" and Muon's Newton-Schulz both follow it)."""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Does `device` multiply bf16 natively (faster than fp32)?"""
    if device.type == "cuda":  # planned from a machine without one: a GPU of this decade
        return (not torch.cuda.is_available()
                or torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type != "cpu":
        return False
    # torch.cpu's cpuinfo probes are private: no public torch API says whether oneDNN has a
    # bf16 kernel for this CPU. Missing probes (another torch) count as "no": fp32 is safe.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
