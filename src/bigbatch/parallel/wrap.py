"""Data-parallel wrapping, decided once: DDP or FSDP2 (`parallel.strategy`), and full state dicts.

    parallelize(model, strategy, device, dist, precision=, fsdp_gradient_sync=)
                                                 DDP wrapper, or FSDP2 applied in place
    full_model_state_dict(model)                 every rank calls; rank 0 gets the CPU tensors

DDP keeps a full replica per rank and all-reduces gradients (averaging them); FSDP2 shards
parameters, gradients and optimizer state over the ranks, gathers each block's weights for its
forward/backward and reduce-scatters (averaging) the gradients. Both average over ranks, which
train_step undoes by multiplying the loss by the world size; both skip the gradient reduction on
non-final micro-steps through `maybe_no_sync` (process_group.py).

Wrapping order (when activation checkpointing or compile arrive, they go before this): FSDP shards
each repeated Transformer layer as its own unit, so only a layer or two's full weights live at a
time, then the root, which owns the embeddings, the final norm and the tied output head (one
parameter, one unit). The layers are found, not named (`transformer_layers`): the classes a
Hugging Face model lists in `_no_split_modules` that occur more than once (BERT's `BertLayer`,
GPT-2's `GPT2Block`, Llama's `LlamaDecoderLayer`), else the children of the largest ModuleList of
one class (the built-in GPT's `blocks`, most custom models). The rule lives in optim/layers.py:
Muon (optim/muon.py) takes the matrices of the same layers.

Under bf16 FSDP2's MixedPrecisionPolicy gathers bf16 parameters for compute and reduces
gradients in fp32, so the all-gathers move half the bytes and no autocast copy of a gathered
weight is kept. fp16 and fp32 gather the fp32 parameters (fp16 relies on autocast and the loss
scaler as without FSDP).

Gradient sync under accumulation (`parallel.fsdp_gradient_sync`): "last" skips the
reduce-scatter on every micro-step but the last, so each rank accumulates the *unsharded* fp32
gradients, 4 P bytes per rank; "every" reduce-scatters after every micro-step into the sharded
gradients, 4 P / world bytes, at the cost of one reduce-scatter per micro-step instead of one per
step. Under "every" `maybe_no_sync` (distributed.py) leaves the model alone, as marked here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bigbatch.config.sections import PARALLEL_STRATEGIES as STRATEGIES
from bigbatch.optim.layers import transformer_layers
from bigbatch.parallel.process_group import SYNC_EVERY_MICRO_STEP, DistInfo

# torch.distributed.checkpoint, .fsdp and .device_mesh are imported where they are used: they
# pull in DTensor and sympy, which took ~45% of a one-process run's start-up imports (measured
# with `python -X importtime`), and a one-process run never needs them.


def mixed_precision_policy(precision: str):
    """bf16 compute parameters with fp32 gradient reduction under bf16; FSDP's default else."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def parallelize(model: nn.Module, strategy: str, device: torch.device, dist: DistInfo, *,
                precision: str = "fp32", fsdp_gradient_sync: str = "last") -> nn.Module:
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
    return shard(model, device, dist.world_size, precision, fsdp_gradient_sync)


def shard(model: nn.Module, device: torch.device, world_size: int, precision: str = "fp32",
          fsdp_gradient_sync: str = "last") -> nn.Module:
    """FSDP2 in place over the default group: each repeated layer a unit, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    policy = mixed_precision_policy(precision)
    for layer in transformer_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if fsdp_gradient_sync == "every":  # "auto" unresolved by the planner means "last"
        setattr(model, SYNC_EVERY_MICRO_STEP, True)
    return model


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules `fully_shard` made into units (each gathers its parameters on its own)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's full state dict on CPU: a collective under FSDP, so every rank must
    call it; rank 0 gets the tensors and the other ranks an empty dict."""
    import torch.distributed as torch_dist

    if not torch_dist.is_initialized():  # one process: nothing to gather, no `module.` prefix
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        return {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Gathered to full tensors on CPU (rank 0 only): any world size, or one process, loads them.
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def load_full_model_state_dict(model: nn.Module, state: dict[str, Any],
                               strict: bool = True) -> None:
    """The inverse of `full_model_state_dict`. Under FSDP rank 0's full tensors are broadcast and
    sharded; a DDP replica (or one process) loads them as they are, so every DDP rank must be given
    the same full `state` (set_model_state_dict's broadcast path misses DDP's `module.` prefix).
    `strict=False` loads a subset (an adapted model's trained weights) and leaves the rest."""
    import torch.distributed as torch_dist

    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if not torch_dist.is_initialized() or inner is not model:
        inner.load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=strict))
