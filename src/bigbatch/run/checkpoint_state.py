"""What a checkpoint holds of the model and the optimizer, and how it is put back.

`model_state`/`load_model_state` and `optimizer_state`/`load_optimizer_state` are the only places
that touch the model's and optimizer's state; under torch.distributed they gather full state
dicts (every rank calls them; rank 0 writes, every rank reads), so a checkpoint loads at any
world size. The model's weights are the unwrapped model's (the tied lm_head saved once, as wte);
with adapters (model.adapter) only the trained ones: the adapters and a head trained whole, never
the frozen base, which the config's model.source names and a resume rebuilds.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from bigbatch.model.adapters import is_adapted
from bigbatch.model.artifacts import state_dict_for_saving, unwrap
from bigbatch.parallel.wrap import full_model_state_dict, load_full_model_state_dict


def tied_embedding_key(model: nn.Module) -> str | None:
    """The key of the input embedding that the output matrix (`lm_head.weight`) is tied to:
    always for the GPT, per its config for a Hugging Face model; None when untied."""
    inner = unwrap(model)
    if is_adapted(inner):  # the output matrix is frozen, so no checkpoint holds it
        return None
    if hasattr(inner, "shape"):  # the built-in GPT
        return "wte.weight"
    config = getattr(inner, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or \
            "lm_head.weight" not in inner.state_dict():
        return None
    embedding = inner.get_input_embeddings()
    return next(f"{name}.weight" for name, module in inner.named_modules() if module is embedding)


def trainable_keys(model: nn.Module) -> set[str] | None:
    """The state-dict keys an adapted model trains (its adapters, a head trained whole); None
    for a model without adapters, all of whose weights a checkpoint holds."""
    inner = unwrap(model)
    if not is_adapted(inner):
        return None
    return {name for name, p in inner.named_parameters() if p.requires_grad}


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights on CPU (rank 0; {} elsewhere under FSDP), a tied output matrix dropped:
    safetensors refuses shared storage. With adapters only the trained weights: the frozen
    base is the model that `model.source` names, which a resume rebuilds as the run did."""
    full = full_model_state_dict(model)
    keep = trainable_keys(model)
    if keep is not None:
        return {k: v.detach().cpu().contiguous() for k, v in full.items() if k in keep}
    if tied_embedding_key(model) is None:  # an untied output matrix is a weight of its own
        return {k: v.detach().cpu().contiguous() for k, v in full.items()}
    return state_dict_for_saving(unwrap(model), full)


def load_model_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    if trainable_keys(model) is not None:  # the adapters over the rebuilt frozen base
        load_full_model_state_dict(model, tensors, strict=False)
        return
    key = tied_embedding_key(model)
    if key is not None and key in tensors:
        tensors = {**tensors, "lm_head.weight": tensors[key]}  # tied: one tensor
    load_full_model_state_dict(model, tensors)


def model_description(model: nn.Module) -> dict[str, Any]:
    """What fixes the model's shapes: the GPT's shape, or a Hugging Face model's config."""
    inner = unwrap(model)
    if hasattr(inner, "shape"):
        return asdict(inner.shape)
    return json.loads(inner.config.to_json_string())


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full (unsharded) state keyed by parameter names, whatever the world size
    (under torch.distributed gathered to rank 0's CPU), so any world size can resume from it."""
    # Imported here, not at start-up: it pulls in DTensor and sympy (parallel/wrap.py says so).
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not torch_dist.is_initialized():  # the full-state options need a process group
        return get_optimizer_state_dict(model, optimizer)
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not torch_dist.is_initialized():  # moves each tensor to its parameter's device
        set_optimizer_state_dict(model, optimizer, state)
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
