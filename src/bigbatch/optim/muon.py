"""torch's Muon, with its Newton-Schulz iteration in fp32 where bf16 would be emulated, and on
FSDP2's sharded matrices.

`torch.optim.Muon` orthogonalises each update with five quintic Newton-Schulz iterations in
bf16 (`grad.bfloat16()` inside `_zeropower_via_newtonschulz`). On a GPU, or a CPU that
multiplies bf16 natively (AVX-512 BF16 or AMX: the test devices.py `native_bf16` makes
for precision.dtype = "auto"), that is the fast path and torch's own step runs unchanged. On a
CPU without them every bf16 matmul is emulated, slower than fp32 (engine/precision.py's
`slow_autocast_warning` says so for autocast), so there
`Muon` runs the same update with the iteration in fp32: torch's `_single_tensor_muon`, line for
line, with the dtype as an argument (tests/unit/optim/test_muon.py checks that, in bf16, it is
torch's step bit for bit).

Over ranks:
- DDP: every rank holds the same averaged gradient and the whole matrices, so each runs the
  whole step unchanged: no communication beyond DDP's all-reduce, but every rank repeats the
  Newton-Schulz iteration of every matrix (world_size copies of the same work).
- FSDP2: a parameter, its gradient and its momentum buffer are DTensors sharded over the ranks
  (`Shard(0)`; the buffer stays sharded like its parameter, so torch.distributed.checkpoint
  saves and reloads it as FSDP's other optimizer state). Newton-Schulz needs the whole matrix
  (Moonlight's "distributed Muon"): each rank all-gathers the matrix's momentum update, one
  rank orthogonalises it (rounds of world_size matrices of about equal cost, one a rank, the
  ranks at once: `newton_schulz_rounds`), and
  scatters each rank its shard of the result (`distribute_tensor` with that rank as the source:
  torch's own split, uneven shards included); momentum, weight decay and the lr adjustment (by
  the whole matrix's shape: a DTensor's `shape`) stay local. BENCHMARKS.md ("Muon over ranks")
  measures that against every rank orthogonalising every matrix (`spread=False`).

The momentum buffer (torch's one state tensor per parameter, "momentum_buffer") and the
parameter groups are torch's, so checkpoints are torch's Muon's whatever the dtype; the dtype is
the machine's, kept on the optimizer and never in a checkpoint.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor
from torch.optim._muon import _adjust_lr

from bigbatch.devices import native_bf16


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


def momentum_update(grad: Tensor, buffer: Tensor, group: dict) -> Tensor:
    """The buffer's EMA step (in place), and the update it gives (Nesterov's or the buffer)."""
    buffer.lerp_(grad, 1 - group["momentum"])
    return grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer


def apply_update(param: Tensor, ortho: Tensor, group: dict) -> None:
    """Decoupled weight decay, then the orthogonalised step at the lr adjusted by the shape
    (a DTensor's `shape` is the whole matrix's, not its shard's)."""
    lr = group["lr"]
    adjusted_lr = _adjust_lr(lr, group["adjust_lr_fn"], param.shape)
    param.mul_(1 - lr * group["weight_decay"])
    param.add_(ortho, alpha=-adjusted_lr)


@torch.no_grad()
def muon_update(params: list[Tensor], grads: list[Tensor], buffers: list[Tensor],
                group: dict, dtype: torch.dtype) -> None:
    """torch's `_single_tensor_muon` with the Newton-Schulz iteration in `dtype`."""
    for param, grad, buffer in zip(params, grads, buffers, strict=True):
        update = momentum_update(grad, buffer, group)
        apply_update(param, newton_schulz(update, group["ns_coefficients"], group["ns_steps"],
                                          group["eps"], dtype), group)


def newton_schulz_rounds(shapes: list[tuple[int, int]], world_size: int) -> list[list[int]]:
    """The matrices (indices into `shapes`) in rounds of `world_size`, the j-th of a round
    orthogonalised by rank j while the others do theirs. Largest first (a matrix of m x n costs
    ~ min(m, n)^2 (2 max(m, n) + min(m, n)) per iteration), so a round's matrices cost about
    the same and no rank waits long for another; a round holds `world_size` whole matrices at a
    time, not all of them. Pure and deterministic: every rank makes the same rounds."""
    def cost(index: int) -> int:
        small, large = sorted(shapes[index])
        return small * small * (2 * large + small)

    order = sorted(range(len(shapes)), key=cost, reverse=True)
    return [order[start:start + world_size] for start in range(0, len(order), world_size)]


@torch.no_grad()
def sharded_muon_update(matrices: list[tuple[Tensor, Tensor, Tensor, dict]],
                        dtype: torch.dtype, spread: bool = True) -> None:
    """`muon_update` over DTensors on a 1-D mesh (FSDP2's), each matrix given as (parameter,
    gradient, momentum buffer, its group): every rank calls it with the same matrices in the
    same order (each round is collectives). Round by round (`newton_schulz_rounds`): all-gather
    the round's updates, rank j orthogonalises the j-th (the ranks at once), and each result is
    scattered in shards from its rank. With `spread=False` every rank orthogonalises every
    matrix and keeps its own shard."""
    from torch.distributed.tensor import distribute_tensor

    mesh = matrices[0][0].device_mesh
    me = mesh.get_local_rank()
    for round_ in newton_schulz_rounds([tuple(m[0].shape) for m in matrices], mesh.size()):
        updates = [momentum_update(grad, buffer, group)
                   for param, grad, buffer, group in (matrices[i] for i in round_)]
        wholes = [update.full_tensor() for update in updates]  # all-gathers
        for position, (index, update, whole) in enumerate(zip(round_, updates, wholes,
                                                              strict=True)):
            param, _, _, group = matrices[index]
            owner = position if spread else None
            if owner is None or owner == me:
                ortho = newton_schulz(whole, group["ns_coefficients"], group["ns_steps"],
                                      group["eps"], dtype).contiguous()
            else:  # the shape the scatter expects; the owner's values replace it
                ortho = torch.empty(whole.shape, dtype=dtype, device=whole.device)
            apply_update(param, distribute_tensor(ortho, mesh, update.placements,
                                                  src_data_rank=owner), group)


def is_dtensor(tensor: Tensor) -> bool:
    # torch.distributed.tensor is loaded only where a DTensor exists (it costs start-up time,
    # parallel/wrap.py says how much), so a module not yet loaded means "not a DTensor".
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` whose Newton-Schulz iteration runs in `ns_dtype` (bf16 over whole
    matrices: torch's own step; fp32: `muon_update`), and over FSDP2's sharded matrices
    (`sharded_muon_update`; `spread=False` repeats each matrix's iteration on every rank)."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, spread: bool = True,
                 **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype
        self.spread = spread

    @torch.no_grad()
    def step(self, closure=None):
        sharded = any(is_dtensor(p) for group in self.param_groups for p in group["params"])
        if self.ns_dtype == torch.bfloat16 and not sharded:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # (param, grad, buffer, group) of every group's sharded matrices, dealt over the
        # ranks at once
        sharded_matrices: list[tuple[Tensor, Tensor, Tensor, dict]] = []
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            buffers: list[Tensor] = []
            self._init_group(group, params, grads, buffers)
            if sharded:
                sharded_matrices += [(p, g, b, group) for p, g, b in zip(params, grads, buffers,
                                                                         strict=True)]
            else:
                muon_update(params, grads, buffers, group, self.ns_dtype)
        if sharded_matrices:
            sharded_muon_update(sharded_matrices, self.ns_dtype, self.spread)
        return loss
