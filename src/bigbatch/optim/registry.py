"""Optimizers: AdamW, LAMB, LARS or SGD with momentum; weight decay only on weights of two or more
dimensions, and (LAMB, LARS) trust ratios only on those."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from bigbatch.optim.large_batch import LAMB, LARS

if TYPE_CHECKING:  # types only: the config room sits above this one
    from bigbatch.config.sections import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices and embeddings decay; biases and LayerNorm gains (1-D) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        # The fused kernel exists for CPU and CUDA in the torch versions we support; it updates
        # all parameters in one pass instead of a Python loop over tensors.
        fused = device.type in ("cpu", "cuda")
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 fused=fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    # The papers exclude norm gains and biases from the trust ratio as well as from weight decay.
    matrices, vectors = groups
    groups = [{**matrices, "trust_ratio": True}, {**vectors, "trust_ratio": False}]
    if cfg.name == "lamb":
        return LAMB(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.name == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum,
                    trust_coefficient=cfg.trust_coefficient)
    raise ValueError(f"unknown optimizer {cfg.name!r}")
