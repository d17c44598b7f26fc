"""Packing (data/packing.py) and the rank-aware sampler (data/loader.py).

Invariants:
- window i of a stream is stream[i*L : i*L + L] as inputs and the same shifted by one as
  targets, both (n, L) int64;
- a target is masked exactly when it would cross a document boundary: the stream is documents
  each followed by the end-of-text token (EOT belongs to the document it ends), and an unmasked
  (input, target) pair always lies in one document, while every in-document pair stays unmasked;
- over one epoch every stream position after the first is a target at most once, and exactly
  the positions of the leftover windows (fewer than one global batch) and of the tail past the
  last whole window are never targets;
- `state_dict()` / `load_state_dict()` (through JSON, as a checkpoint would) continue the exact
  same order, mid-epoch and across an epoch boundary;
- ranks' shards are disjoint and together the global batch, so 2 ranks see 1 rank's samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bigbatch.batch import split_batch
from bigbatch.data.loader import (
    GlobalBatchSampler,
    TokenLoader,
    eval_micro_batches,
    shard_micro_batches,
)
from bigbatch.data.packing import IGNORE_INDEX, gather_windows, num_windows
from bigbatch.errors import UsageError

EOT = 0


def documents_stream(lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (documents each followed by EOT) and, per position, the id of its document."""
    rng = np.random.default_rng(seed)
    tokens, doc_of = [], []
    for doc_id, length in enumerate(lengths):
        tokens += [*rng.integers(1, 500, size=length).tolist(), EOT]
        doc_of += [doc_id] * (length + 1)
    return np.array(tokens, dtype=np.uint16), np.array(doc_of)


def test_windows_have_exact_shapes_and_contents():
    tokens, _ = documents_stream([30, 5, 0, 41, 12])
    seq_len = 8
    count = num_windows(len(tokens), seq_len)
    assert count == (len(tokens) - 1) // seq_len
    indices = np.arange(count)[::-1]
    inputs, targets = gather_windows(tokens, indices, seq_len, EOT)
    assert inputs.shape == targets.shape == (count, seq_len)
    assert inputs.dtype == targets.dtype == torch.int64
    stream = torch.from_numpy(tokens.astype(np.int64))
    for row, i in enumerate(indices):
        window = stream[i * seq_len:i * seq_len + seq_len + 1]
        assert torch.equal(inputs[row], window[:-1])
        expected = torch.where(window[:-1] == EOT, IGNORE_INDEX, window[1:])
        assert torch.equal(targets[row], expected)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 30), min_size=2, max_size=12),
       seq_len=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_no_unmasked_target_crosses_a_document_boundary(lengths, seq_len, seed):
    tokens, doc_of = documents_stream(lengths, seed)
    count = num_windows(len(tokens), seq_len)
    if count == 0:
        return
    _, targets = gather_windows(tokens, np.arange(count), seq_len, EOT)
    input_pos = np.arange(count)[:, None] * seq_len + np.arange(seq_len)  # target at pos + 1
    same_document = doc_of[input_pos] == doc_of[input_pos + 1]
    unmasked = (targets != IGNORE_INDEX).numpy()
    assert np.array_equal(unmasked, same_document)


def position_loader(num_tokens: int, seq_len: int, micro_batch_size: int, num_micro_steps: int,
                    world_size: int = 1, rank: int = 0, seed: int = 7) -> TokenLoader:
    """A loader over tokens whose value is their position (no EOT), so a target names its
    position in the stream."""
    global_tokens = seq_len * micro_batch_size * num_micro_steps * world_size
    plan = split_batch(global_tokens, seq_len, micro_batch_size, world_size)
    return TokenLoader(np.arange(num_tokens, dtype=np.int64), -1, plan, rank=rank, seed=seed)


def test_each_token_is_a_target_once_per_epoch_bar_the_remainder():
    num_tokens, seq_len = 1000, 8
    loader = position_loader(num_tokens, seq_len, micro_batch_size=4, num_micro_steps=4)
    windows = num_windows(num_tokens, seq_len)                  # 124
    steps_per_epoch = windows // loader.split.global_sequences   # 7, leaving 12 windows over
    for epoch in range(2):
        hits = np.zeros(num_tokens, dtype=np.int64)
        for _ in range(steps_per_epoch):
            for mb in loader.next_step():
                assert mb.inputs.shape == (4, seq_len)
                np.add.at(hits, mb.targets.flatten().numpy(), 1)
        assert loader.sampler.epoch == epoch
        assert hits.max() == 1
        assert hits[0] == 0  # the first token is never a target
        never = np.flatnonzero(hits[1:] == 0) + 1
        leftover_windows = windows - steps_per_epoch * loader.split.global_sequences
        tail = num_tokens - 1 - windows * seq_len
        assert len(never) == leftover_windows * seq_len + tail
        # The leftovers are whole windows (plus the tail), not scattered tokens.
        in_windows = never[never <= windows * seq_len]
        assert np.array_equal(np.unique((in_windows - 1) // seq_len, return_counts=True)[1],
                              np.full(leftover_windows, seq_len))


def draw(sampler: GlobalBatchSampler, steps: int) -> list[list[int]]:
    return [sampler.next_global_batch().tolist() for _ in range(steps)]


@pytest.mark.parametrize("steps_before_save", [3, 6, 7, 8, 15])
def test_sampler_resume_continues_the_same_order(steps_before_save):
    """10 windows per batch out of 73: 7 batches per epoch, so saving after 7 steps sits exactly
    on the epoch boundary and 8 or 15 is inside a later epoch."""
    original = GlobalBatchSampler(num_windows=73, global_sequences=10, seed=11)
    draw(original, steps_before_save)
    state = json.loads(json.dumps(original.state_dict()))
    expected = draw(original, 12)

    resumed = GlobalBatchSampler(num_windows=73, global_sequences=10, seed=11)
    resumed.load_state_dict(state)
    assert draw(resumed, 12) == expected


def test_sampler_order_is_seeded_and_changes_per_epoch():
    a, b = (GlobalBatchSampler(73, 10, seed=11) for _ in range(2))
    epoch0 = draw(a, 7)
    assert epoch0 == draw(b, 7)
    assert draw(a, 7) != epoch0
    assert draw(GlobalBatchSampler(73, 10, seed=12), 7) != epoch0


def test_loader_resume_reproduces_the_micro_batches():
    original = position_loader(1000, 8, micro_batch_size=4, num_micro_steps=2)
    for _ in range(5):
        original.next_step()
    state = json.loads(json.dumps(original.state_dict()))
    resumed = position_loader(1000, 8, micro_batch_size=4, num_micro_steps=2)
    resumed.load_state_dict(state)
    for _ in range(20):  # crosses into the next epoch
        for a, b in zip(original.next_step(), resumed.next_step(), strict=True):
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


def test_sampler_refuses_a_state_from_another_corpus_or_seed():
    state = GlobalBatchSampler(73, 10, seed=11).state_dict()
    for other in (GlobalBatchSampler(74, 10, seed=11), GlobalBatchSampler(73, 10, seed=12)):
        with pytest.raises(UsageError, match="seed"):
            other.load_state_dict(state)


@pytest.mark.parametrize("world_size,micro_batch_size", [(1, 4), (2, 4), (2, 2), (4, 1), (4, 8)])
def test_shards_are_disjoint_and_cover_the_global_batch(world_size, micro_batch_size):
    global_batch = np.random.default_rng(0).permutation(1000)[:64]
    shards = [shard_micro_batches(global_batch, rank, world_size, micro_batch_size)
              for rank in range(world_size)]
    for micro_batches in shards:
        assert len(micro_batches) == 64 // world_size // micro_batch_size
        assert all(len(mb) == micro_batch_size for mb in micro_batches)
    seen = np.concatenate([mb for micro_batches in shards for mb in micro_batches])
    assert np.array_equal(seen, global_batch)  # disjoint, complete, in order


def test_two_ranks_see_the_samples_one_rank_sees():
    single = position_loader(2000, 8, micro_batch_size=4, num_micro_steps=4)
    ranks = [position_loader(2000, 8, micro_batch_size=2, num_micro_steps=4, world_size=2,
                             rank=r) for r in range(2)]
    for _ in range(10):
        expected = torch.cat([mb.inputs for mb in single.next_step()])
        per_rank = [torch.cat([mb.inputs for mb in loader.next_step()]) for loader in ranks]
        assert torch.equal(torch.cat(per_rank), expected)


def test_eval_batches_split_over_ranks_without_overlap():
    tokens, _ = documents_stream([200] * 10)
    kwargs = dict(tokens=tokens, eot_id=EOT, seq_len=16, eval_tokens=16 * 37, micro_batch_size=4)
    whole = eval_micro_batches(**kwargs, rank=0, world_size=1)
    assert sum(len(mb.inputs) for mb in whole) == 37
    parts = [eval_micro_batches(**kwargs, rank=r, world_size=2) for r in range(2)]
    def rows(batches):
        return sorted(map(tuple, torch.cat([mb.inputs for mb in batches]).tolist()))

    assert rows(parts[0] + parts[1]) == rows(whole)
    assert not set(rows(parts[0])) & set(rows(parts[1]))


def test_eval_windows_spread_over_the_whole_split():
    """The validation windows sample the split end to end (its first windows are a few
    documents only), evenly and without repeats."""
    tokens, _ = documents_stream([200] * 10)
    available = num_windows(len(tokens), 16)
    batches = eval_micro_batches(tokens, eot_id=EOT, seq_len=16, eval_tokens=16 * 20,
                                 micro_batch_size=8, rank=0, world_size=1)
    inputs = torch.cat([mb.inputs for mb in batches])
    starts = [int(np.flatnonzero(np.lib.stride_tricks.sliding_window_view(tokens, 16)
                                 .__eq__(row.numpy()).all(axis=1))[0]) for row in inputs]
    assert len(starts) == 20 and starts == sorted(set(starts))
    assert starts[0] == 0 and starts[-1] >= (available - available // 20 - 1) * 16
    gaps = np.diff(starts) // 16
    assert gaps.max() - gaps.min() <= 1


def test_unigram_loss_is_the_cross_entropy_of_smoothed_training_frequencies():
    from bigbatch.data.corpus import Corpus

    train = np.array([0, 0, 0, 1, 2, 2], dtype=np.int64)  # counts 3, 1, 2, 0 of a 4-token vocab

    class FourTokens:
        def get_vocab_size(self):
            return 4

    corpus = Corpus(FourTokens(), train, train[:0], eot_id=3, cache_dir=Path("."))
    # add-one: p = (4, 2, 3, 1) / 10
    expected = -(np.log(0.4) + np.log(0.1) + np.log(0.4)) / 3
    assert abs(corpus.unigram_loss(np.array([0, 3, 0])) - expected) < 1e-12


def test_cold_cache_is_filled_by_a_child_process_with_the_same_tokens(tmp_path):
    """The training process tokenizes in a child (its heap stays clean for the planner); the
    result must be the cache an in-process build makes, and a child's bad-input error must
    come back as the same one-line UsageError."""
    from bigbatch.config.sections import DataConfig
    from bigbatch.data.corpus import prepare_corpus, prepare_corpus_in_child

    text = tmp_path / "text"
    text.mkdir()
    for i in range(12):
        (text / f"doc{i}.txt").write_text(f"document {i}: " + "the cat sat on a mat. " * (5 + i))
    in_child = prepare_corpus_in_child(DataConfig(path=str(text), vocab_size=300,
                                                  cache_dir=str(tmp_path / "child")))
    in_process = prepare_corpus(DataConfig(path=str(text), vocab_size=300,
                                           cache_dir=str(tmp_path / "here")))
    assert np.array_equal(in_child.train_tokens, in_process.train_tokens)
    assert np.array_equal(in_child.val_tokens, in_process.val_tokens)
    assert in_child.tokenizer.to_str() == in_process.tokenizer.to_str()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    with pytest.raises(UsageError, match="holds no readable text"):
        prepare_corpus_in_child(DataConfig(path=str(empty), cache_dir=str(tmp_path / "c")))
