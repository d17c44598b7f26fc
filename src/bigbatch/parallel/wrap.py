"""Data-parallel wrapping, decided once: DDP or FSDP2 (`parallel.strategy`), and full state dicts.

    parallelize(model, strategy, device, dist)   DDP wrapper, or FSDP2 applied in place
    full_model_state_dict(model)                 every rank calls; rank 0 gets the CPU tensors

DDP keeps a full replica per rank and all-reduces gradients (averaging them); FSDP2 shards
parameters, gradients and optimizer state over the ranks, gathers each block's weights for its
forward/backward and reduce-scatters (averaging) the gradients. Both average over ranks, which
train_step undoes by multiplying the loss by the world size; both skip the gradient reduction on
non-final micro-steps through `maybe_no_sync` (process_group.py).

Wrapping order (when activation checkpointing or compile arrive, they go before this): FSDP shards
each Transformer block as its own unit, so only one block's full weights live at a time, then the
root, which owns the embeddings, the final norm and the tied output head (one parameter, one unit).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from bigbatch.config.sections import PARALLEL_STRATEGIES as STRATEGIES
from bigbatch.parallel.process_group import DistInfo

# Gathered to full tensors on CPU (rank 0 only), so any world size, or one process, can load them.
FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def parallelize(model: nn.Module, strategy: str, device: torch.device, dist: DistInfo
                ) -> nn.Module:
    """The module to train: `model` itself on one process, else wrapped for `strategy`.

    Build the optimizer *after* this: FSDP replaces the parameters with sharded DTensors.
    """
    if not dist.enabled:
        return model
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy != "fsdp":
        raise ValueError(f"unknown parallel strategy {strategy!r}: one of {STRATEGIES}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.world_size,))
    for block in getattr(model, "blocks", ()):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's full state dict on CPU: a collective under FSDP, so every rank must
    call it; rank 0 gets the tensors and the other ranks an empty dict."""
    import torch.distributed as torch_dist

    if not torch_dist.is_initialized():  # one process: nothing to gather, no `module.` prefix
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        return {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    return get_model_state_dict(model, options=FULL_ON_CPU)


def load_full_model_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    """The inverse of `full_model_state_dict`. Under FSDP rank 0's full tensors are broadcast and
    sharded; a DDP replica (or one process) loads them as they are, so every DDP rank must be given
    the same full `state` (set_model_state_dict's broadcast path misses DDP's `module.` prefix)."""
    import torch.distributed as torch_dist

    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if not torch_dist.is_initialized() or inner is not model:
        inner.load_state_dict(state)
        return
    set_model_state_dict(model, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
