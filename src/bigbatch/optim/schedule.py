"""Learning-rate schedules, pure: linear warmup, then cosine, linear or constant decay to a floor,
or warmup-stable-decay (the peak, then a cooldown over the last steps); the peak scaled with the
batch. `set_learning_rates` applies them to each parameter group's own
base lr (torchtitan's schedulers recompute every group from its `base_lrs` the same way)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # types only: the config room sits above this one
    from bigbatch.config.sections import OptimConfig


def learning_rate(step: float, *, peak_lr: float, warmup_steps: int, total_steps: int,
                  decay: str, min_lr_ratio: float, cooldown_fraction: float = 0.2,
                  cooldown_shape: str = "1-sqrt") -> float:
    """The learning rate of optimizer step `step` (0-based; fractional under a batch ramp).

    Warmup: step s < W gets peak * (s + 1) / W, so the first step is near zero and the last
    warmup step (s = W - 1) is exactly the peak. Decay then runs from the peak at s = W - 1 to
    the floor (peak * min_lr_ratio) at the last step s = total_steps - 1; "wsd" holds the peak
    and runs its cooldown over the last `cooldown_fraction` of the steps instead (`wsd`).
    """
    if step + 1 <= warmup_steps:  # for whole steps: step < W; a fractional step past W - 1
        # is in the decay already, so the warmup fraction never exceeds 1.
        # The fraction first: W / W is exactly 1.0, so the last warmup step is exactly the peak
        # ((peak * W) / W can be an ulp off, e.g. 3e-3 with W = 3).
        return peak_lr * ((step + 1) / warmup_steps)
    floor = peak_lr * min_lr_ratio
    if decay == "wsd":
        return wsd(step, peak_lr=peak_lr, floor=floor, warmup_steps=warmup_steps,
                   total_steps=total_steps, cooldown_fraction=cooldown_fraction,
                   cooldown_shape=cooldown_shape)
    decay_steps = total_steps - max(warmup_steps, 1)
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - max(warmup_steps - 1, 0)) / decay_steps)
    if decay == "constant":
        return peak_lr
    if decay == "linear":
        return floor + (peak_lr - floor) * (1.0 - progress)
    if decay == "cosine":
        return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown decay {decay!r}")


def wsd(step: float, *, peak_lr: float, floor: float, warmup_steps: int, total_steps: int,
        cooldown_fraction: float, cooldown_shape: str) -> float:
    """Warmup-stable-decay after warmup (Hägele et al. 2024, "Scaling Laws and Compute-Optimal
    Training Beyond Fixed Training Durations"): the peak until the cooldown, which spans the
    last C = cooldown_fraction x T steps, from the peak at s = T - 1 - C to the floor at
    s = T - 1: lr = floor + (peak - floor) x (1 - sqrt(p)) for "1-sqrt", x (1 - p) for
    "linear", p = (s - (T - 1 - C)) / C. A cooldown longer than the steps after warmup starts
    where warmup ends (s = W - 1) instead."""
    start = wsd_cooldown_start(total_steps, warmup_steps, cooldown_fraction)
    length = total_steps - 1 - start
    if step <= start:
        return peak_lr
    progress = 1.0 if length <= 0 else min(1.0, (step - start) / length)
    if cooldown_shape == "1-sqrt":
        return floor + (peak_lr - floor) * (1.0 - math.sqrt(progress))
    if cooldown_shape == "linear":
        return floor + (peak_lr - floor) * (1.0 - progress)
    raise ValueError(f"unknown cooldown shape {cooldown_shape!r}")


def wsd_cooldown_start(total_steps: int, warmup_steps: int, cooldown_fraction: float) -> float:
    """The (fractional) step of `wsd` after which the cooldown runs: every step s <= it is at
    the peak or in warmup. It never falls as total_steps grows (T x (1 - C) - 1, C <= 1), so what
    a run trained up to it is shared by every longer run of the same settings."""
    return max(total_steps - 1 - cooldown_fraction * total_steps, warmup_steps - 1, 0)


def before_cooldown(tokens_seen: int, opt: OptimConfig, *, full_batch_tokens: int,
                    max_steps: int) -> bool:
    """Whether a wsd run that has trained `tokens_seen` tokens took all its steps before the
    cooldown: its last step, ending at tokens_seen, sits at tokens_seen / full_batch_tokens - 1
    (`learning_rate_at_tokens`, the same float operations) and not past `wsd_cooldown_start`.
    Such a state is also a state of any longer run of the same settings: one can be extended
    from it exactly. False for every other decay, whose lr depends on max_steps throughout."""
    if opt.decay != "wsd":
        return False
    start = wsd_cooldown_start(max_steps, opt.warmup_steps, opt.cooldown_fraction)
    return tokens_seen / full_batch_tokens - 1 <= start


def scaled_peak_lr(lr: float, rule: str, batch_tokens: int, reference_tokens: int) -> float:
    """The peak lr at a global batch of `batch_tokens`, given `lr` at `reference_tokens`:
    linear (Goyal et al. 2017, for SGD-type updates) or square root (for Adam-type updates,
    whose step size already scales with the gradient noise)."""
    if rule == "none":
        return lr
    ratio = batch_tokens / reference_tokens
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ValueError(f"unknown lr scaling {rule!r}")


def describe_lr_scaling(lr: float, rule: str, batch_tokens: int, reference_tokens: int) -> str:
    """The start-up line: the rule and its arithmetic."""
    peak = scaled_peak_lr(lr, rule, batch_tokens, reference_tokens)
    if rule == "none":
        return f"lr scaling: none (peak lr {lr:g} at every batch)"
    factor = f"{batch_tokens:,} / {reference_tokens:,}"
    factor = f"sqrt({factor})" if rule == "sqrt" else f"({factor})"
    return f"lr scaling: {rule}: peak lr = {lr:g} x {factor} = {peak:.6g}"


def learning_rate_at_tokens(tokens_end: int, *, step_tokens: int, peak_lr: float,
                            warmup_steps: int, total_steps: int, decay: str,
                            min_lr_ratio: float, cooldown_fraction: float = 0.2,
                            cooldown_shape: str = "1-sqrt") -> float:
    """`learning_rate`, with the position counted in tokens: a step that ends at `tokens_end`
    training tokens sits at step (tokens_end / step_tokens - 1), in units of the full batch
    (`step_tokens` = batch.global_tokens). So warmup and decay span the same tokens whatever the
    batch of each step, and a ramped batch does not bend the schedule. With the full batch on
    every step, tokens_end = (s + 1) x step_tokens and this is `learning_rate(s)` exactly."""
    return learning_rate(tokens_end / step_tokens - 1, peak_lr=peak_lr,
                         warmup_steps=warmup_steps, total_steps=total_steps, decay=decay,
                         min_lr_ratio=min_lr_ratio, cooldown_fraction=cooldown_fraction,
                         cooldown_shape=cooldown_shape)


def step_learning_rate(opt: OptimConfig, *, batch_tokens: int, tokens_end: int,
                       full_batch_tokens: int, max_steps: int, base_lr: float | None = None
                       ) -> float:
    """The lr of a step of `batch_tokens` that ends at `tokens_end` training tokens: the peak
    (`base_lr`, by default `optim.lr`) scaled to that batch (`optim.lr_scaling`), placed on the
    token-counted schedule."""
    reference = opt.reference_batch_tokens or full_batch_tokens
    return learning_rate_at_tokens(
        tokens_end, step_tokens=full_batch_tokens,
        peak_lr=scaled_peak_lr(opt.lr if base_lr is None else base_lr, opt.lr_scaling,
                               batch_tokens, reference),
        warmup_steps=opt.warmup_steps, total_steps=max_steps, decay=opt.decay,
        min_lr_ratio=opt.min_lr_ratio, cooldown_fraction=opt.cooldown_fraction,
        cooldown_shape=opt.cooldown_shape)


def set_learning_rates(optimizer: Any, opt: OptimConfig, *, batch_tokens: int, tokens_end: int,
                       full_batch_tokens: int, max_steps: int) -> float:
    """Set every parameter group's lr for a step of `batch_tokens` ending at `tokens_end`, from
    the group's own base lr (`optimizer.base_lrs`, recorded by registry.py; `optim.lr` for every
    group of an optimizer built elsewhere). Returns the lr of a group whose base is `optim.lr`
    (every group of AdamW, LAMB, LARS, SGD): the one logged.

    In exact arithmetic a group's lr is its base x a multiplier of the step (the batch scaling,
    the warmup fraction and the decay are all linear in the peak), so groups keep the ratio of
    their bases at every step. In floats each group's lr is `step_learning_rate` with its base
    for `optim.lr`: a group whose base is `optim.lr` gets exactly the lr of the same float
    operations as before groups had bases of their own, bit for bit."""
    groups = optimizer.param_groups
    bases = getattr(optimizer, "base_lrs", None) or [opt.lr] * len(groups)
    if len(bases) != len(groups):
        raise ValueError(f"{len(bases)} base lrs for {len(groups)} parameter groups")
    lrs = {opt.lr: step_learning_rate(opt, batch_tokens=batch_tokens, tokens_end=tokens_end,
                                      full_batch_tokens=full_batch_tokens, max_steps=max_steps)}
    for group, base in zip(groups, bases, strict=True):
        if base not in lrs:
            lrs[base] = step_learning_rate(opt, batch_tokens=batch_tokens, tokens_end=tokens_end,
                                           full_batch_tokens=full_batch_tokens,
                                           max_steps=max_steps, base_lr=base)
        group["lr"] = lrs[base]
    return lrs[opt.lr]
