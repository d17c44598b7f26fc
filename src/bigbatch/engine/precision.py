"""Mixed precision: one autocast context and one GradScaler (enabled only for fp16).

bf16 has fp32's exponent range, so it needs no loss scaling; fp16 does, and the scaler's
gradients must be unscaled before they are measured or clipped (train_step does this).

`precision.dtype = "auto"` (the default) is bf16 where the device multiplies bf16 natively and
fp32 elsewhere: on a CPU without AVX-512 BF16 or AMX, oneDNN has no bf16 kernel and autocast's
matmuls fall back to a reference loop, many times slower than fp32 (BENCHMARKS.md, "Numbers that
were in docstrings"), so bf16 there would slow a run down, not speed it up.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from bigbatch.config.sections import Config, PrecisionConfig
from bigbatch.devices import native_bf16

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """Autocast (bf16/fp16) and the GradScaler (enabled for fp16 only) that train_step uses."""

    dtype: str
    device_type: str
    scaler: torch.amp.GradScaler

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=AUTOCAST_DTYPES[self.dtype])

    def outside_autocast(self) -> contextlib.AbstractContextManager:
        """Autocast off inside an autocast region, which keeps the region's cache of weight casts
        (the cache is dropped only when the outermost autocast context exits)."""
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, enabled=False)

    @property
    def scaling(self) -> bool:
        return self.scaler.is_enabled()

    @classmethod
    def create(cls, dtype: str = "fp32", device: torch.device | str = "cpu") -> Precision:
        """For a loop of your own: "fp32", "bf16" (autocast), "fp16" (autocast and dynamic
        loss scaling, with precision.* defaults) or "auto" (resolve_dtype)."""
        return make_precision(PrecisionConfig(dtype=dtype), torch.device(device))


def resolve_dtype(name: str, device: torch.device) -> tuple[str, str]:
    """`precision.dtype` for a run on `device`, and why (for the start-up line) when "auto"
    chose it ("" for an explicit choice)."""
    if name != "auto":
        return name, ""
    if native_bf16(device):
        return "bf16", "auto"
    return "fp32", f"auto: {device_description(device)} has no native bf16"


def slow_autocast_warning(name: str, device: torch.device) -> str:
    """A warning for an explicit bf16/fp16 on a CPU without native bf16 ("" otherwise)."""
    if name not in AUTOCAST_DTYPES or device.type != "cpu" or native_bf16(device):
        return ""
    return (f"{device_description(device)} has no native {name} matmul: autocast runs them "
            "tens of times slower than fp32 here; precision.dtype = 'auto' or 'fp32' is faster")


def with_resolved_dtype(cfg: Config, device: torch.device) -> tuple[Config, str]:
    """`cfg` with "auto" replaced by what it means on `device` (what config.toml records and
    the planner plans for), and resolve_dtype's reason."""
    dtype, why = resolve_dtype(cfg.precision.dtype, device)
    return replace(cfg, precision=replace(cfg.precision, dtype=dtype)), why


def device_description(device: torch.device) -> str:
    if device.type == "cpu":
        return f"this CPU ({torch.backends.cpu.get_cpu_capability()})"
    return str(device)


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls (cuBLAS) and convolutions (cuDNN), or full IEEE fp32. Through the
    `fp32_precision` settings where torch has them: mixing them with the legacy `allow_tf32`
    flags makes torch refuse to read either."""
    mode = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def make_precision(cfg: PrecisionConfig, device: torch.device) -> Precision:
    dtype = resolve_dtype(cfg.dtype, device)[0]
    if device.type == "cuda":  # process-wide, decided once per run, before the first matmul
        set_tf32(cfg.tf32)
    scaler = torch.amp.GradScaler(device.type, init_scale=cfg.init_scale,
                                  growth_factor=cfg.growth_factor,
                                  backoff_factor=cfg.backoff_factor,
                                  growth_interval=cfg.growth_interval,
                                  enabled=dtype == "fp16")
    return Precision(dtype, device.type, scaler)
