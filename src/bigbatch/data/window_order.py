"""The seeded order in which an epoch visits a corpus's windows: every window exactly once.

Up to EXACT_ORDER_MAX_WINDOWS the order is numpy's permutation of every index (as it always
was: the small recipes' runs are unchanged). Above it a table of every index stops being cheap:
it costs 8 bytes per window on every rank and a shuffle at every epoch's start whose random
memory accesses took 6 s for the 11.7M windows of a 10 GB corpus here (benchmarks/bench_loader.py),
so a 1 TB corpus would hold 9 GB per rank and wait minutes. There the order is a keyed bijection
of [0, n) computed for each step's indices as they are drawn: a 4-round Feistel network on the
smallest even number of bits that covers n, with cycle walking (an index that maps past n is
mapped again until it lands inside, which keeps the map a bijection of [0, n); the domain is
under 4n, so a few passes at most) - the construction format-preserving encryption uses
(Black & Rogaway 2002, "Ciphers with arbitrary finite domains"). Constant memory, time
proportional to the batch, and the same (seed, epoch) always gives the same order, so a resumed
run continues it exactly.
"""

from __future__ import annotations

import numpy as np

EXACT_ORDER_MAX_WINDOWS = 1 << 22  # 4.2M windows (~1.1B tokens at 256): a 34 MB table
ROUNDS = 4
BLOCK = 1 << 16  # positions computed at a time above the exact limit


def _mix(values: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finalizer of (values ^ key): a well-spread 64-bit hash (wraps mod 2^64)."""
    z = values ^ key
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class WindowOrder:
    """The epoch's order: `take(start, count)` = the windows at positions start..start+count."""

    def __init__(self, num_windows: int, seed: int, epoch: int,
                 exact_max: int | None = None) -> None:
        self.num_windows = num_windows
        rng = np.random.default_rng([seed, epoch])
        if num_windows <= (EXACT_ORDER_MAX_WINDOWS if exact_max is None else exact_max):
            self._table: np.ndarray | None = rng.permutation(num_windows)
            return
        self._table = None
        half_bits = max(1, ((num_windows - 1).bit_length() + 1) // 2)
        self._half_bits = np.uint64(half_bits)
        self._half_mask = np.uint64((1 << half_bits) - 1)
        self._keys = [np.uint64(k) for k in rng.integers(0, 2**63, ROUNDS, dtype=np.int64)]
        self._block_index, self._block = -1, np.empty(0, dtype=np.int64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half_bits, x & self._half_mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right, key) & self._half_mask)
        return (left << self._half_bits) | right

    def _compute(self, start: int, count: int) -> np.ndarray:
        out = self._feistel(np.arange(start, start + count, dtype=np.uint64))
        outside = out >= np.uint64(self.num_windows)
        while outside.any():  # cycle walking: map again until inside [0, n)
            out[outside] = self._feistel(out[outside])
            outside = out >= np.uint64(self.num_windows)
        return out.astype(np.int64)

    def take(self, start: int, count: int) -> np.ndarray:
        if self._table is not None:
            return self._table[start:start + count]
        pieces = []
        while count > 0 and start < self.num_windows:
            # Whole blocks at a time: numpy's per-call cost would otherwise dominate a step's
            # few dozen indices (a block costs ~1 ms; BLOCK int64s are 512 KiB).
            block = start // BLOCK
            if block != self._block_index:
                first = block * BLOCK
                self._block = self._compute(first, min(BLOCK, self.num_windows - first))
                self._block_index = block
            piece = self._block[start - block * BLOCK:][:count]
            pieces.append(piece)
            start, count = start + len(piece), count - len(piece)
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
