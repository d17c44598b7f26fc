"""Labelled texts -> token windows -> length-grouped, dynamically padded micro-batches.

A text longer than `data.max_length` tokens becomes several windows (the fast tokenizer's own
overflow, consecutive windows sharing `data.stride` tokens); each window carries the weight
1 / (its text's window count), so every text weighs one in the loss, however long. A micro-batch's
`num_targets()` is the sum of its weights, so train_step's normaliser (the step's total over
micro-steps and ranks) makes the loss the exact mean over the step's texts.

The global batch is `batch.global_sequences` texts (with all their windows), drawn by the same
seeded, resumable sampler as language modelling. Each rank takes its contiguous share of texts,
sorts their windows by length and cuts them into micro-batches of `micro_batch_size` windows or,
with `batch.micro_batch_tokens`, of as many windows as fit that many padded tokens; each
micro-batch is padded only to its own longest window.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigbatch.data.loader import GlobalBatchSampler
from bigbatch.errors import UsageError
from bigbatch.tasks.classify.batch import ClassificationBatch

# --- Reading files ----------------------------------------------------------------------------

def read_labelled_file(path: Path, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    """(texts, labels as strings) from a .tsv, .csv (header row) or .jsonl file."""
    if not path.is_file():
        raise UsageError(f"classification data {str(path)!r} is not a file: give a .tsv, .csv or "
                         ".jsonl file of labelled texts")
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        with path.open(newline="", encoding="utf-8") as f:
            # TSV files such as GLUE's are not quoted: a quote character is part of the text.
            reader = (csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv"
                      else csv.DictReader(f))
            rows = list(reader)
            columns = reader.fieldnames or []
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        columns = sorted(rows[0]) if rows else []
    else:
        raise UsageError(f"classification data {str(path)!r} has an unknown format: use .tsv, "
                         ".csv or .jsonl")
    for name, key in (("data.text_field", text_field), ("data.label_field", label_field)):
        if key not in columns:
            raise UsageError(f"{name} = {key!r} is not a column of {str(path)!r}: its columns "
                             f"are {', '.join(map(str, columns))}")
    if not rows:
        raise UsageError(f"classification data {str(path)!r} holds no rows")
    return [str(row[text_field] or "") for row in rows], [str(row[label_field]) for row in rows]


def label_names(labels: list[str]) -> list[str]:
    """The label vocabulary, id order: numerically if every label is an integer, else sorted."""
    unique = set(labels)
    if all(label.lstrip("-").isdigit() for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def label_ids(labels: list[str], names: list[str], path: Path) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(labels) - index.keys())
    if unknown:
        raise UsageError(f"{str(path)!r} has labels the training file has not: "
                         f"{', '.join(unknown[:5])} (training labels: {', '.join(names)})")
    return np.array([index[label] for label in labels], dtype=np.int64)


# --- Windows ----------------------------------------------------------------------------------

@dataclass
class Windows:
    """The token windows of one split: window w belongs to text `doc_of_window[w]`."""

    tokens: list[np.ndarray]    # per window, special tokens included
    doc_of_window: np.ndarray   # (num_windows,) ascending
    doc_start: np.ndarray       # (num_docs + 1,) text d has windows doc_start[d]:doc_start[d+1]
    labels: np.ndarray          # (num_docs,) label ids
    pad_id: int

    @property
    def num_docs(self) -> int:
        return len(self.labels)

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], dtype=np.int64)

    @cached_property
    def weights(self) -> np.ndarray:
        """1 / (windows of the window's text): every text weighs one in total."""
        counts = np.diff(self.doc_start)
        return 1.0 / counts[self.doc_of_window]

    def windows_of(self, docs: np.ndarray) -> np.ndarray:
        if len(docs) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(self.doc_start[d], self.doc_start[d + 1]) for d in docs])


def tokenize_windows(tokenizer, texts: list[str], labels: np.ndarray, max_length: int,
                     stride: int) -> Windows:
    """Split every text into windows of at most `max_length` tokens (special tokens included)
    that overlap by `stride` tokens, with the fast tokenizer's overflow (no hand-made splitter)."""
    content = max_length - tokenizer.num_special_tokens_to_add()
    if stride >= content:
        raise UsageError(f"data.stride = {stride} must be smaller than the {content} text tokens "
                         f"of a window (data.max_length = {max_length} minus special tokens)")
    encoded = tokenizer(texts, truncation=True, max_length=max_length, stride=stride,
                        return_overflowing_tokens=True, return_attention_mask=False,
                        return_token_type_ids=False)
    doc_of_window = np.asarray(encoded["overflow_to_sample_mapping"], dtype=np.int64)
    doc_start = np.searchsorted(doc_of_window, np.arange(len(texts) + 1))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Windows([np.asarray(ids, dtype=np.int64) for ids in encoded["input_ids"]],
                   doc_of_window, doc_start, labels, pad_id)


# --- Micro-batches ----------------------------------------------------------------------------

def group_by_length(lengths: np.ndarray, micro_batch_size: int, micro_batch_tokens: int
                    ) -> list[np.ndarray]:
    """Positions into `lengths`, longest first, cut into micro-batches (pure): `micro_batch_size`
    windows each, or with `micro_batch_tokens` > 0 the cut of `token_budget_cuts`."""
    order = np.argsort(-lengths, kind="stable")
    if micro_batch_tokens <= 0:
        return [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    bounds = token_budget_cuts(lengths[order], micro_batch_tokens)
    return [order[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def token_budget_cuts(sorted_lengths: np.ndarray, budget: int) -> list[int]:
    """Cut lengths sorted longest first into runs, each within `budget` padded tokens (count x
    its first, longest length; a single longer window stands alone), minimising the padded
    tokens plus budget / 16 tokens per micro-batch (pure; returns the run boundaries).

    Filling each micro-batch greedily to the budget lets a run's longest window set the padding
    of many much shorter ones (SST-2, 256 sentences, budget 4096: 2 micro-batches, half their
    tokens padding; forward+backward of MiniLM took 2x as long as with these cuts: 5 micro-
    batches, 21% padding). Cutting at every length change instead makes many tiny micro-batches;
    the fixed price per micro-batch stands for that overhead. Dynamic programming over the cut
    points: O(n x the longest run)."""
    n = len(sorted_lengths)
    lengths = sorted_lengths.astype(np.int64)
    per_micro_batch = budget // 16
    best = np.full(n + 1, np.iinfo(np.int64).max // 4, dtype=np.int64)
    best[0] = 0
    previous = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        # A run ending here holds at most budget // (its shortest, this) windows (or just one).
        longest_run = max(1, budget // max(int(lengths[end - 1]), 1))
        starts = np.arange(max(0, end - longest_run), end)
        counts = end - starts
        padded = counts * lengths[starts]
        feasible = (padded <= budget) | (counts == 1)
        cost = np.where(feasible, best[starts] + padded + per_micro_batch, best[end])
        previous[end] = int(starts[np.argmin(cost)])
        best[end] = cost.min()
    bounds = [n]
    while bounds[-1] > 0:
        bounds.append(int(previous[bounds[-1]]))
    return bounds[::-1]


def collate(windows: Windows, chosen: np.ndarray, weights: np.ndarray) -> ClassificationBatch:
    """Windows `chosen`, padded to the longest of them (dynamic padding)."""
    rows = [windows.tokens[w] for w in chosen]
    longest = max(len(r) for r in rows)
    input_ids = np.full((len(rows), longest), windows.pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = row
        attention_mask[i, :len(row)] = 1
    docs = windows.doc_of_window[chosen]
    return ClassificationBatch(torch.from_numpy(input_ids), torch.from_numpy(attention_mask),
                               torch.from_numpy(windows.labels[docs]),
                               torch.from_numpy(weights.astype(np.float64)),
                               torch.from_numpy(docs))


def filler_batch(windows: Windows) -> ClassificationBatch:
    """A weight-0 micro-batch of the shortest window: adds nothing to loss, count or metrics, but
    lets a rank with fewer micro-batches run as many forwards as the others (FSDP gathers weights
    inside every forward, so all ranks must take part in each)."""
    shortest = np.array([int(np.argmin(windows.lengths))])
    batch = collate(windows, shortest, np.zeros(1))
    batch.doc_ids = torch.full_like(batch.doc_ids, -1)
    return batch


def rank_micro_batches(windows: Windows, docs_per_rank: list[np.ndarray], rank: int,
                       micro_batch_size: int, micro_batch_tokens: int
                       ) -> list[ClassificationBatch]:
    """Rank `rank`'s micro-batches for its texts, padded with fillers to the most any rank has
    (every rank computes every rank's count from the same texts: no communication needed)."""
    all_weights = windows.weights
    lengths = windows.lengths
    counts, mine = [], []
    for r, docs in enumerate(docs_per_rank):
        window_ids = windows.windows_of(docs)
        groups = group_by_length(lengths[window_ids], micro_batch_size, micro_batch_tokens)
        counts.append(len(groups))
        if r == rank:
            mine = [collate(windows, window_ids[g], all_weights[window_ids[g]]) for g in groups]
    while len(mine) < max(counts):
        mine.append(filler_batch(windows))
    return mine


class ClassificationLoader:
    """The training stream of one rank: `next_step()` returns its micro-batches for one step."""

    def __init__(self, windows: Windows, global_sequences: int, micro_batch_size: int,
                 micro_batch_tokens: int, rank: int, world_size: int, seed: int) -> None:
        if global_sequences % world_size:
            raise UsageError(f"batch.global_sequences = {global_sequences} is not divisible by "
                             f"the {world_size} ranks")
        if windows.num_docs < global_sequences:
            raise UsageError(f"the training file holds {windows.num_docs} texts, fewer than one "
                             f"global batch (batch.global_sequences = {global_sequences})")
        self.windows, self.rank, self.world_size = windows, rank, world_size
        self.micro_batch_size, self.micro_batch_tokens = micro_batch_size, micro_batch_tokens
        self.sampler = GlobalBatchSampler(windows.num_docs, global_sequences, seed)
        self.last_step_tokens = 0   # real (unpadded) tokens of the last step, all ranks
        self.last_num_micro_steps = 0

    def next_step(self, shape=None) -> list[ClassificationBatch]:
        # fit() passes the step's shape; a classification step is always the full batch of texts
        docs = self.sampler.next_global_batch()
        per_rank = len(docs) // self.world_size
        shares = [docs[r * per_rank:(r + 1) * per_rank] for r in range(self.world_size)]
        batches = rank_micro_batches(self.windows, shares, self.rank, self.micro_batch_size,
                                     self.micro_batch_tokens)
        self.last_step_tokens = int(self.windows.lengths[self.windows.windows_of(docs)].sum())
        self.last_num_micro_steps = len(batches)
        return batches

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def eval_batches(windows: Windows, micro_batch_size: int, micro_batch_tokens: int, rank: int,
                 world_size: int) -> list[ClassificationBatch]:
    """Every text of the split once, dealt to ranks in turn, windows grouped by length."""
    docs = np.arange(windows.num_docs)
    shares = [docs[r::world_size] for r in range(world_size)]
    return rank_micro_batches(windows, shares, rank, micro_batch_size, micro_batch_tokens)
