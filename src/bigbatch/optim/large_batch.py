"""LAMB and LARS: layer-wise trust ratios for very large batches.

Written here because neither PyTorch nor a well-kept package on the registry provides them:
`torch-optimizer` (the usual source) was last released in 2021 and pins an old torch. Both follow
the papers' update equations, checked in tests/unit/optim/test_large_batch_optim.py:

LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2), per tensor x:
    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    u = r + wd x
    x = x - lr * (|x| / |u|) * u            (trust ratio 1 when |x| or |u| is 0)

LARS (You et al. 2017, "Large Batch Training of Convolutional Networks", Algorithm 1), per tensor w:
    local_lr = eta |w| / (|g| + wd |w|)     (1 when |w| or |g| is 0)
    v = momentum v + lr * local_lr * (g + wd w)
    w = w - v

Parameter groups with `trust_ratio = False` (biases and LayerNorm gains: the 1-D tensors, see
optim/registry.py) take the plain update with trust ratio 1 (LAMB: Adam; LARS: SGD with momentum)
and no weight decay, as both papers do.
"""

from __future__ import annotations

import torch


def _trust(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, or 1 where either is 0 (a fresh zero tensor, a zero update)."""
    usable = (numerator > 0) & (denominator > 0)
    return torch.where(usable, numerator / denominator.clamp(min=torch.finfo(numerator.dtype).tiny),
                       torch.ones_like(numerator))


class LAMB(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, trust_ratio: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      trust_ratio=trust_ratio))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()  # a CPU scalar: no device sync
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + group["eps"])
                if group["trust_ratio"]:
                    update.add_(p, alpha=group["weight_decay"])
                    trust = _trust(torch.linalg.vector_norm(p), torch.linalg.vector_norm(update))
                    p.sub_(update * (trust * group["lr"]))
                else:
                    p.sub_(update, alpha=group["lr"])
        return loss


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3, trust_ratio: bool = True) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient,
                                      trust_ratio=trust_ratio))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["trust_ratio"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    decay = group["weight_decay"]
                    local_lr = _trust(group["trust_coefficient"] * w_norm,
                                      g_norm + decay * w_norm)
                    step = (grad + decay * p) * (local_lr * group["lr"])
                else:
                    step = grad * group["lr"]
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                velocity = state["momentum_buffer"]
                velocity.mul_(group["momentum"]).add_(step)
                p.sub_(velocity)
        return loss
