"""Where a packed row's documents start (data/packing.py `document_positions`, the loaders'
`document_mask`).

Invariants, on streams of documents each followed by the end-of-text token:
- two tokens of a row share a document by their position_ids (a new one at each 0) exactly when
  they share one in the stream, and each token's position counts from its document's first
  token in the row (or from the row's start, for a document begun in an earlier row);
- the loaders attach them only when asked, also to sequence-length warmup's cut sequences and to
  the fully masked validation batches of short ranks.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bigbatch.batch import StepShape, split_batch
from bigbatch.data.loader import TokenLoader, eval_micro_batches
from bigbatch.data.packing import document_positions, num_windows, window_batch
from bigbatch.model.document_attention import document_ids
from test_packing import EOT, documents_stream


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 30), min_size=2, max_size=12),
       seq_len=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_positions_restart_exactly_at_each_document(lengths, seq_len, seed):
    tokens, doc_of = documents_stream(lengths, seed)
    count = num_windows(len(tokens), seq_len)
    if count == 0:
        return
    batch = window_batch(tokens, np.arange(count), seq_len, EOT, document_mask=True)
    docs = document_ids(batch.position_ids).numpy()
    stream_docs = doc_of[np.arange(count)[:, None] * seq_len + np.arange(seq_len)]
    same = docs[:, :, None] == docs[:, None, :]
    assert np.array_equal(same, stream_docs[:, :, None] == stream_docs[:, None, :])
    earlier_in_document = np.tril(same, k=-1).sum(axis=2)  # tokens before it in its document
    assert np.array_equal(batch.position_ids.numpy(), earlier_in_document)


def test_document_positions_of_a_row():
    row = torch.tensor([[7, 8, EOT, 9, EOT, EOT, 5, 6]])
    assert document_positions(row, EOT).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_loaders_attach_positions_only_when_asked():
    tokens, _ = documents_stream([13, 4, 30, 9, 21, 6, 17], seed=3)
    split = split_batch(64, seq_len=16, micro_batch_size=2, world_size=1)
    plain = TokenLoader(tokens, EOT, split, rank=0, seed=1).next_step()
    assert all(mb.position_ids is None for mb in plain)
    masked = TokenLoader(tokens, EOT, split, rank=0, seed=1, document_mask=True)
    for shape_seq_len in (None, 4):  # 4: sequence-length warmup cuts each window in four
        shape = StepShape(64, 2, 8, shape_seq_len) if shape_seq_len else None
        for mb in masked.next_step(shape):
            assert torch.equal(mb.position_ids, document_positions(mb.inputs, EOT))
    # Two ranks over one validation batch: rank 1 gets a fully masked copy, positions and all.
    padded = eval_micro_batches(tokens, EOT, 16, 32, 2, rank=1, world_size=2,
                                document_mask=True)
    assert torch.equal(padded[0].position_ids, document_positions(padded[0].inputs, EOT))
