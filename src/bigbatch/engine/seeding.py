"""The process's random streams (Python, NumPy, torch), seeded from `train.seed`, and each
rank's own stream for dropout and the like."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch's CUDA ones too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(*keys: int) -> int:
    """A seed of its own for each tuple of keys (train.seed, rank, ...), decorrelated from its
    neighbours by NumPy's SeedSequence hashing."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def seed_rank_streams(seed: int, rank: int) -> None:
    """Called once the model is built (the same weights on every rank, all seeded alike): every
    rank but 0 reseeds Python, NumPy and torch, so ranks draw different dropout masks instead of
    the same ones. Rank 0 keeps the stream one process has, so a single-process run is unchanged.
    The data order does not come from these streams (the loader permutes with its own seeded
    generator), so it stays independent of the world size."""
    if rank > 0:
        seed_everything(derived_seed(seed, rank))
