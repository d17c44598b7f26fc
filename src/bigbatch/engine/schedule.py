"""Learning-rate schedules, pure: linear warmup, then cosine, linear or constant decay to a floor."""

from __future__ import annotations

import math


def learning_rate(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int,
                  decay: str, min_lr_ratio: float) -> float:
    """The learning rate of optimizer step `step` (0-based).

    Warmup: step s < W gets peak * (s + 1) / W, so the first step is near zero and the last
    warmup step (s = W - 1) is exactly the peak. Decay then runs from the peak at s = W - 1 to
    the floor (peak * min_lr_ratio) at the last step s = total_steps - 1.
    """
    if step < warmup_steps:
        # The fraction first: W / W is exactly 1.0, so the last warmup step is exactly the peak
        # ((peak * W) / W can be an ulp off, e.g. 3e-3 with W = 3).
        return peak_lr * ((step + 1) / warmup_steps)
    floor = peak_lr * min_lr_ratio
    decay_steps = total_steps - max(warmup_steps, 1)
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - max(warmup_steps - 1, 0)) / decay_steps)
    if decay == "constant":
        return peak_lr
    if decay == "linear":
        return floor + (peak_lr - floor) * (1.0 - progress)
    if decay == "cosine":
        return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown decay {decay!r}")
