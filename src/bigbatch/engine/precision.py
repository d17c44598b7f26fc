"""Mixed precision: one autocast context and one GradScaler (enabled only for fp16).

bf16 has fp32's exponent range, so it needs no loss scaling; fp16 does, and the scaler's
gradients must be unscaled before they are measured or clipped (train_step does this).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from bigbatch.config.sections import PrecisionConfig

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
        """For a loop of your own: "fp32", "bf16" (autocast) or "fp16" (autocast and dynamic
        loss scaling, with precision.* defaults)."""
        return make_precision(PrecisionConfig(dtype=dtype), torch.device(device))


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
    if device.type == "cuda":  # process-wide, decided once per run, before the first matmul
        set_tf32(cfg.tf32)
    scaler = torch.amp.GradScaler(device.type, init_scale=cfg.init_scale,
                                  growth_factor=cfg.growth_factor,
                                  backoff_factor=cfg.backoff_factor,
                                  growth_interval=cfg.growth_interval,
                                  enabled=cfg.dtype == "fp16")
    return Precision(cfg.dtype, device.type, scaler)
