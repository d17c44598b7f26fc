"""torch.distributed, decided once: who am I (DistInfo from torchrun's environment), no_sync, sums.

bigbatch never implements its own collective engine: DDP/FSDP do the gradient all-reduce, and the
helpers here only add the few scalar reductions exact normalisation needs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Who this process is among the ranks (torchrun's RANK, LOCAL_RANK, WORLD_SIZE)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = DistInfo()
# Set by parallelize() on an FSDP2 model that reduce-scatters after every micro-step.
SYNC_EVERY_MICRO_STEP = "bigbatch_sync_every_micro_step"


def dist_info_from_env() -> DistInfo:
    """Read once at start-up; torchrun sets RANK, LOCAL_RANK and WORLD_SIZE."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)),
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    world_size=int(os.environ.get("WORLD_SIZE", 1)))


def init_process_group(info: DistInfo, device: torch.device) -> None:
    """Bind this process to its GPU, then (several ranks) join the group.

    `torch.cuda.set_device` comes first, before anything touches CUDA: FSDP's `fully_shard`,
    `.cuda()` and NCCL's communicator all use the *current* device, which is cuda:0 in every
    process until it is set. Under NCCL `device_id` binds the group to that GPU at once (an
    eager communicator, and no guessing of the device by the first collective).
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")


def maybe_no_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync() (FSDP2: set_requires_gradient_sync(False)) around forward *and* backward
    of every micro-step but the last.

    Wrapping only the backward would still all-reduce on every micro-step under DDP.
    """
    if enabled and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if enabled and hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        if getattr(model, SYNC_EVERY_MICRO_STEP, False):  # parallel.fsdp_gradient_sync = every
            return contextlib.nullcontext()
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    # Gradients accumulate unsharded on each rank; the next synced backward reduce-scatters the sum.
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of `grads`, a plain tensor even when they are FSDP's sharded DTensors.

    On sharded grads get_total_norm already reduces over the ranks (tested against one process
    in tests/integration/test_distributed.py) and returns a replicated DTensor; full_tensor() just unwraps it
    (no communication), so the finiteness check, logging and checkpoints see a plain tensor.
    clip_grads_with_norm_ and clip_grad_value_ work on the local shards as they are.
    """
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(value: object, info: DistInfo) -> object:
    """Rank 0's `value` on every rank (a small picklable object: a path, a message). Under NCCL
    the current CUDA device must be this rank's, as for every object collective."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(value: object, info: DistInfo) -> list[object]:
    """Every rank's `value`, in rank order, on every rank (small picklable objects)."""
    if not info.enabled:
        return [value]
    gathered: list[object] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """End of a run: all ranks meet, then tear the group down while Python is fully alive.

    Left to interpreter exit, gloo's threads can still hold finished async work (FSDP's
    collectives) and abort the process ("terminate called without an active exception").
    """
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
