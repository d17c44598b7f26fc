"""Random number generator states: captured and restored per rank (each rank draws its own
dropout masks), for checkpoint.py. Python's, NumPy's and torch's (CPU, and CUDA on a GPU)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from bigbatch.parallel.process_group import DistInfo, all_gather_objects


def capture_rng(device: torch.device) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able Python and NumPy states, torch generator states as tensors)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    return plain, tensors


def gather_rng(dist: DistInfo, device: torch.device
               ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Every rank's RNG states (each rank draws its own dropout masks): the plain states in rank
    order and the tensors as `rank{r}.NAME`. A collective: every rank calls it."""
    per_rank = all_gather_objects(capture_rng(device), dist)
    tensors = {f"rank{rank}.{name}": tensor.cpu()
               for rank, (_, rank_tensors) in enumerate(per_rank)
               for name, tensor in rank_tensors.items()}
    return [plain for plain, _ in per_rank], tensors


def rank_rng(plain: list[dict[str, Any]] | dict[str, Any], tensors: dict[str, torch.Tensor],
             rank: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """`rank`'s saved states, or None when the checkpoint holds none for it (it was written by
    fewer ranks). A checkpoint from before per-rank states holds rank 0's alone, unprefixed."""
    if isinstance(plain, dict):
        return (plain, tensors) if rank == 0 else None
    if rank >= len(plain):
        return None
    prefix = f"rank{rank}."
    return plain[rank], {name[len(prefix):]: tensor for name, tensor in tensors.items()
                         if name.startswith(prefix)}


def restore_rng(plain: dict[str, Any], tensors: dict[str, torch.Tensor],
                device: torch.device) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
