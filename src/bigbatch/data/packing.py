"""Packed rows, pure: a token stream cut into `seq_len + 1` windows, one every `seq_len` tokens.

Window i covers stream[i*seq_len : i*seq_len + seq_len + 1]; its inputs are the first seq_len
tokens and its targets the last seq_len, so consecutive windows share one token and every stream
token after the first is a target exactly once per epoch (bar the remainder past the last window).

Documents are separated by the end-of-text token. A target whose input is that token would be
the next document's first token predicted from the previous document: it is masked with
IGNORE_INDEX, so no target crosses a document boundary.

With document masking (`data.document_mask`) each row also carries `position_ids` that restart
at 0 on the token after each end-of-text token (`document_positions`): the model then attends
within a document only, and its learned positions count from each document's start.
"""

from __future__ import annotations

import numpy as np
import torch

from bigbatch.batch import IGNORE_INDEX, MicroBatch


def num_windows(num_tokens: int, seq_len: int) -> int:
    return max(0, (num_tokens - 1) // seq_len)


def gather_windows(tokens: np.ndarray, indices: np.ndarray | list[int], seq_len: int,
                   eot_id: int, piece_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (len(indices), seq_len) int64, targets masked at boundaries.

    With `piece_len` (a divisor of seq_len; sequence-length warmup) each window is cut into
    seq_len / piece_len consecutive sequences of piece_len tokens instead, (len(indices) *
    seq_len / piece_len, piece_len): the same targets, each still exactly once.
    """
    piece_len = piece_len or seq_len
    starts = np.asarray(indices, dtype=np.int64)[:, None] * seq_len
    starts = (starts + np.arange(0, seq_len, piece_len)).reshape(-1, 1)
    rows = np.asarray(tokens[starts + np.arange(piece_len + 1)], dtype=np.int64)
    inputs = torch.from_numpy(rows[:, :-1].copy())
    targets = torch.from_numpy(rows[:, 1:].copy())
    targets[inputs == eot_id] = IGNORE_INDEX
    return inputs, targets


def document_positions(inputs: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Each token's position inside its document, (rows, seq_len) int64: 0 at the row's first
    token and on every token that follows an end-of-text token (the end-of-text token belongs
    to the document it ends), counting up from there."""
    rows, length = inputs.shape
    index = torch.arange(length, device=inputs.device).expand(rows, length)
    starts = torch.zeros_like(inputs, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = inputs[:, :-1] == eot_id
    last_start = torch.where(starts, index, 0).cummax(dim=1).values
    return index - last_start


def window_batch(tokens: np.ndarray, indices: np.ndarray | list[int], seq_len: int, eot_id: int,
                 piece_len: int | None = None, document_mask: bool = False) -> MicroBatch:
    """`gather_windows`'s rows as a micro-batch; with `document_mask`, with their
    `document_positions` as `position_ids` (computed per cut sequence under a piece_len)."""
    inputs, targets = gather_windows(tokens, indices, seq_len, eot_id, piece_len)
    return MicroBatch(inputs, targets,
                      document_positions(inputs, eot_id) if document_mask else None)
