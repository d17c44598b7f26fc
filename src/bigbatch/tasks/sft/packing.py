"""Examples -> packed rows of next-token pairs, with positions that restart at every example.

An example of n ids gives n - 1 (input, target) pairs; its target is the next id where that id
carries the loss, IGNORE_INDEX elsewhere. Examples longer than a row (`seq_len` pairs) are cut
to it and counted (the count is printed at start-up, never silent). Rows are filled by
best-fit decreasing (TRL's "bfd" packing): the longest example first, each into the fullest row
it fits; the capacities are kept in a segment tree so placing one costs O(log seq_len), not a
scan of the rows. The end of a row that no example fills is padding (input the pad id, no
target, positions counting on from 0, so it is a document of its own under document masking).
`position_ids` restart at 0 where each example begins: document-masked attention reads the
documents from them (a new one wherever the position is 0), as transformers' packed sequences do.
Pure functions of numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bigbatch.batch import IGNORE_INDEX


@dataclass(frozen=True)
class PackedRows:
    inputs: np.ndarray        # (rows, seq_len) int64 token ids
    targets: np.ndarray       # (rows, seq_len) int64; IGNORE_INDEX where no loss
    position_ids: np.ndarray  # (rows, seq_len) int64; 0 where an example (or padding) begins
    examples: int
    truncated: int            # examples cut to the row length
    filled: int               # input positions holding an example's token (not padding)

    @property
    def fill(self) -> float:
        return self.filled / self.inputs.size


def example_pairs(ids: np.ndarray, loss: np.ndarray, seq_len: int
                  ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(inputs, targets, truncated) of one example: its last `seq_len` pairs at most."""
    cut = len(ids) > seq_len + 1
    # Cut from the start: the response (the end) is what the example teaches; a prompt cut from
    # its beginning still leads into it. (TRL's default keeps the start and can cut the answer.)
    ids, loss = ids[-(seq_len + 1):], loss[-(seq_len + 1):]
    targets = np.where(loss[1:], ids[1:], IGNORE_INDEX)
    return ids[:-1], targets, cut


class _Capacities:
    """Rows by remaining capacity: `best(n)` is a row with the least capacity >= n. A segment
    tree over capacities 0..seq_len, each leaf the number of rows with that capacity."""

    def __init__(self, seq_len: int) -> None:
        self.size = 1
        while self.size < seq_len + 1:
            self.size *= 2
        self.count = np.zeros(2 * self.size, dtype=np.int64)
        self.rows: list[list[int]] = [[] for _ in range(seq_len + 1)]

    def _add(self, capacity: int, delta: int) -> None:
        node = capacity + self.size
        while node:
            self.count[node] += delta
            node //= 2

    def push(self, row: int, capacity: int) -> None:
        self.rows[capacity].append(row)
        self._add(capacity, 1)

    def pop_best(self, need: int) -> tuple[int, int] | None:
        """(row, capacity) of a row with the least capacity >= need, taken out; or None."""
        capacity = self._leftmost(1, 0, self.size - 1, need)
        if capacity < 0:
            return None
        self._add(capacity, -1)
        return self.rows[capacity].pop(), capacity

    def _leftmost(self, node: int, lo: int, hi: int, need: int) -> int:
        """The least capacity >= need in [lo, hi] that has rows, or -1."""
        if hi < need or self.count[node] == 0:
            return -1
        if lo == hi:
            return lo
        mid = (lo + hi) // 2
        found = self._leftmost(2 * node, lo, mid, need)
        return found if found >= 0 else self._leftmost(2 * node + 1, mid + 1, hi, need)


def best_fit_decreasing(lengths: list[int], seq_len: int, order: np.ndarray) -> list[list[int]]:
    """Example indices per row: longest first (ties in `order`, a seeded permutation), each into
    the row it fills best."""
    by_length = sorted(order.tolist(), key=lambda i: -lengths[i])
    capacities = _Capacities(seq_len)
    rows: list[list[int]] = []
    for i in by_length:
        found = capacities.pop_best(lengths[i])
        if found is None:
            rows.append([i])
            row, left = len(rows) - 1, seq_len - lengths[i]
        else:
            row, capacity = found
            rows[row].append(i)
            left = capacity - lengths[i]
        if left > 0:
            capacities.push(row, left)
    return rows


def pack_examples(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int,
                  seed: int) -> PackedRows:
    """`examples` (ids, loss mask) packed into rows of `seq_len` pairs; rows in a seeded order."""
    pairs = [example_pairs(ids, loss, seq_len) for ids, loss in examples]
    lengths = [len(inputs) for inputs, _, _ in pairs]
    rng = np.random.default_rng(seed)
    rows = best_fit_decreasing(lengths, seq_len, rng.permutation(len(pairs)))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    inputs = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    targets = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((len(rows), seq_len), dtype=np.int64)
    filled = 0
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            example_inputs, example_targets, _ = pairs[i]
            n = len(example_inputs)
            inputs[r, at:at + n] = example_inputs
            targets[r, at:at + n] = example_targets
            positions[r, at:at + n] = np.arange(n)
            at += n
        positions[r, at:] = np.arange(seq_len - at)  # padding: one document of its own
        filled += at
    return PackedRows(inputs, targets, positions, examples=len(pairs),
                      truncated=sum(cut for _, _, cut in pairs), filled=filled)
