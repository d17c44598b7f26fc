"""Optimizers: AdamW with weight decay only on weights of two or more dimensions."""

from __future__ import annotations

import torch
from torch import nn

from bigbatch.config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices and embeddings decay; biases and LayerNorm gains (1-D) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    # The fused kernel exists for CPU and CUDA in the torch versions we support; it updates all
    # parameters in one pass instead of a Python loop over tensors.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
