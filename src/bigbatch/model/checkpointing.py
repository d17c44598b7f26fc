"""Activation checkpointing per Transformer block, non-reentrant, applied from outside the model.

A checkpointed block keeps only its input for backward and runs its forward again there, trading
one extra block forward per block for its saved activations. The GPT stays ignorant of it: the
block's `forward` is replaced on the instance, so module names and `state_dict()` keys are
unchanged (a wrapper module would rename every parameter). Apply this first, then compile, then
DDP/FSDP.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from bigbatch.errors import UsageError

MODES = ("none", "all", "every_n", "auto")


def _checkpointed(forward, *args, **kwargs):
    # Non-reentrant: works with DDP, with inputs that do not require grad, and under autocast
    # (the recomputation replays the autocast state of the original forward).
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def blocks_to_checkpoint(n_layer: int, mode: str, every: int) -> list[int]:
    """Indices of the checkpointed blocks: every_n takes blocks 0, every, 2*every, ..."""
    if mode in ("none", "auto"):  # "auto" is resolved by the planner; unresolved means none
        return []
    if mode == "all":
        return list(range(n_layer))
    if mode == "every_n":
        return list(range(0, n_layer, every))
    raise UsageError(f"model.activation_checkpointing = {mode!r} is invalid: one of {MODES}")


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> int:
    """Checkpoint the blocks of `model.blocks` that `mode` selects; returns how many."""
    chosen = blocks_to_checkpoint(len(model.blocks), mode, every)
    for index in chosen:
        block = model.blocks[index]
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(chosen)
