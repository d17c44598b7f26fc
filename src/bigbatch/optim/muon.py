"""torch's Muon, with its Newton-Schulz iteration in fp32 where bf16 would be emulated.

`torch.optim.Muon` orthogonalises each update with five quintic Newton-Schulz iterations in
bf16 (`grad.bfloat16()` inside `_zeropower_via_newtonschulz`). On a GPU, or a CPU that
multiplies bf16 natively (AVX-512 BF16 or AMX: the test devices.py `native_bf16` makes
for precision.dtype = "auto"), that is the fast path and torch's own step runs unchanged. On a
CPU without them every bf16 matmul is emulated, slower than fp32 (engine/precision.py's
`slow_autocast_warning` says so for autocast), so there
`Muon` runs the same update with the iteration in fp32: torch's `_single_tensor_muon`, line for
line, with the dtype as an argument (tests/unit/optim/test_muon.py checks that, in bf16, it is
torch's step bit for bit).

The momentum buffer (torch's one state tensor per parameter, "momentum_buffer") and the
parameter groups are torch's, so checkpoints are torch's Muon's whatever the dtype; the dtype is
the machine's, kept on the optimizer and never in a checkpoint.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim._muon import _adjust_lr

from bigbatch.devices import native_bf16
from bigbatch.errors import UsageError


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 (torch's choice) unless `device` is a CPU without native bf16 matmuls: fp32."""
    if device.type != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else torch.float32


def newton_schulz(grad: Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float, dtype: torch.dtype) -> Tensor:
    """torch's `_zeropower_via_newtonschulz` in `dtype`: the quintic iteration
    X <- a X + (b A + c A A) X, A = X X^T, from X = G / |G|_F (the wide orientation)."""
    a, b, c = coefficients
    ortho = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        ortho = ortho.T
    ortho.div_(ortho.norm().clamp(min=eps))
    for _ in range(steps):
        gram = ortho @ ortho.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        ortho = torch.addmm(ortho, update, ortho, beta=a)
    return ortho.T if tall else ortho


@torch.no_grad()
def muon_update(params: list[Tensor], grads: list[Tensor], buffers: list[Tensor],
                group: dict, dtype: torch.dtype) -> None:
    """torch's `_single_tensor_muon` with the Newton-Schulz iteration in `dtype`."""
    lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
    for param, grad, buffer in zip(params, grads, buffers, strict=True):
        buffer.lerp_(grad, 1 - momentum)
        update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"],
                               group["eps"], dtype)
        adjusted_lr = _adjust_lr(lr, group["adjust_lr_fn"], param.shape)
        param.mul_(1 - lr * weight_decay)
        param.add_(update, alpha=-adjusted_lr)


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` whose Newton-Schulz iteration runs in `ns_dtype` (bf16: torch's own
    step; fp32: `muon_update`)."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs) -> None:
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            for p in group["params"]:
                if type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor":
                    raise UsageError("optim.name = 'muon' cannot step FSDP's sharded matrices "
                                     "(torch's Muon orthogonalises whole ones): "
                                     "parallel.strategy = 'ddp', or another optimizer")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            buffers: list[Tensor] = []
            self._init_group(group, params, grads, buffers)
            muon_update(params, grads, buffers, group, self.ns_dtype)
        return loss
