"""Fill a corpus cache by streaming: memory stays flat however large the corpus.

Two passes over the documents, neither holding more than one batch:
1. scan: count the documents and their split (by a hash of each name: no list of documents is
   needed), and stream a seeded sample of the training documents, about `data.bpe_sample_bytes`
   of text, into the BPE trainer (`train_from_iterator`);
2. tokenize: `encode_batch_fast` on batches of BATCH_CHARS (Rust threads on all cores), each
   document's ids and an end-of-text token appended to `train.bin` or `val.bin`.

Every SHARD_CHARS of text the token files are flushed to disk and `progress.json` records how
far they are complete; a restarted preparation cuts the files back to that point and goes on from
there, so an interruption costs at most one shard. `meta.json` is written last: a cache without
it is never opened as a corpus (corpus.py), only resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from bigbatch.config.sections import DataConfig
from bigbatch.config.units import format_bytes, parse_bytes
from bigbatch.data.progress import PrepareProgress
from bigbatch.data.sources import (
    Document,
    SourceFile,
    estimated_text_bytes,
    is_validation,
    iter_documents,
    source_files,
)
from bigbatch.data.token_files import token_dtype_for
from bigbatch.data.tokenizer import EOT, eot_id, load_tokenizer_dir, save_atomically, train_bpe
from bigbatch.errors import UsageError

BATCH_CHARS = 4 << 20   # text per encode_batch call: its Encodings (~30 B a character) are the
                        # largest transient, and 4 MiB still gives every core many documents
SHARD_CHARS = 64 << 20  # text between two commits: what an interrupted preparation redoes
CACHE_FORMAT = 3  # 1: train.npy/val.npy from lists in memory; 2: documents named by absolute path


@dataclass(frozen=True)
class SplitRule:
    """Which documents are validation: the source's own split where it has one, else a hash
    of the name; `held_out` >= 0 when too few documents left one side empty, and then exactly
    that one (the last) is validation."""
    val_fraction: float
    held_out: int = -1

    def is_val(self, index: int, doc: Document) -> bool:
        if self.held_out >= 0:
            return index == self.held_out
        if doc.split is not None:
            return doc.split == "val"
        return is_validation(doc.name, self.val_fraction)


def in_bpe_sample(doc_name: str, rate: float) -> bool:
    """A seeded Bernoulli(rate) choice per document, independent of the validation hash."""
    if rate >= 1.0:
        return True
    bucket = int(hashlib.sha1(f"bpe-sample\0{doc_name}".encode()).hexdigest()[:8], 16)
    return bucket / 0xFFFFFFFF < rate


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


class Preparation:
    """One cache being filled: its sources, settings, and resumable state."""

    def __init__(self, cfg: DataConfig, cache: Path) -> None:
        self.cfg, self.cache = cfg, cache
        self.sources: list[SourceFile] = source_files(cfg.path, cfg.pattern)
        self.total_bytes = sum(s.path.stat().st_size for s in self.sources)
        self.pretokenized = self.sources[0].kind == "tokens"
        if self.pretokenized and not cfg.tokenizer:
            raise UsageError(f"data.path = {cfg.path!r} holds token ids "
                             f"({self.sources[0].path.name}): set data.tokenizer to the "
                             "directory of the tokenizer that made them, or data.pattern to "
                             "read only text files")
        self.state_path = cache / "progress.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def documents(self, progress: PrepareProgress, tokenizer: Tokenizer | None = None
                  ) -> Iterator[tuple[int, Document]]:
        vocab, eot = (tokenizer.get_vocab_size(), eot_id(tokenizer)) if tokenizer else (0, -1)
        return enumerate(iter_documents(self.sources, self.cfg.doc_chars, EOT,
                                        self.cfg.text_field, progress.add_bytes, vocab, eot))

    def save_state(self) -> None:
        _write_json(self.state_path, self.state)

    # -- pass 1 ------------------------------------------------------------------------------

    def scan(self) -> None:
        """Count documents, fix the split rule, and train (or load) the tokenizer."""
        cfg = self.cfg
        given = load_tokenizer_dir(cfg.tokenizer) if cfg.tokenizer else None
        sample_bytes = parse_bytes(cfg.bpe_sample_bytes, "data.bpe_sample_bytes")
        train_bytes = (1 - cfg.val_fraction) * estimated_text_bytes(self.sources, cfg.text_field)
        rate = sample_bytes / train_bytes if train_bytes else 1.0
        counts = {"docs": 0, "train_docs": 0, "val_docs": 0, "sample_chars": 0, "last_size": 0}

        def train_texts(rule: SplitRule, phase: str) -> Iterator[str]:
            progress = PrepareProgress(phase, self.total_bytes)
            for key in counts:
                counts[key] = 0
            for index, doc in self.documents(progress, given):
                counts["docs"] += 1
                counts["last_size"] = doc.size
                if rule.is_val(index, doc):
                    counts["val_docs"] += 1
                    continue
                counts["train_docs"] += 1
                if given is None and in_bpe_sample(doc.name, rate):
                    counts["sample_chars"] += doc.size
                    yield doc.text
            progress.close()

        rule = SplitRule(cfg.val_fraction)
        what = (f"training a {cfg.vocab_size}-token BPE on a "
                f"{format_bytes(min(sample_bytes, train_bytes))} sample" if given is None
                else "counting documents")
        began = time.perf_counter()
        tokenizer = self.read_or_train(given, train_texts(rule, f"scan ({what})"))
        if counts["docs"] == 0:
            raise UsageError(f"data.path = {cfg.path!r} holds no readable text")
        if counts["docs"] == 1:
            raise UsageError(f"data.path = {cfg.path!r} is one document of {counts['last_size']}"
                             " characters: too little to split; lower data.doc_chars or give "
                             "more text")
        if not counts["val_docs"] or not counts["train_docs"]:
            # Too few documents for the fraction to land one on each side: hold out the last.
            rule = SplitRule(cfg.val_fraction, held_out=counts["docs"] - 1)
            tokenizer = self.read_or_train(given, train_texts(rule, "scan (too few documents "
                                                                     "to split by hash)"))
        save_atomically(tokenizer, self.cache / "tokenizer.json")
        print(f"data: scan done in {time.perf_counter() - began:.1f}s: {counts['docs']:,} "
              f"documents ({counts['val_docs']:,} for validation)"
              + (f", BPE trained on {format_bytes(counts['sample_chars'])} of text"
                 if given is None else ""), file=sys.stderr, flush=True)
        self.state = {"rule": asdict(rule), **counts, "docs_done": 0, "train_tokens": 0,
                      "val_tokens": 0, "shards": 0}
        self.save_state()

    def read_or_train(self, given: Tokenizer | None, texts: Iterator[str]) -> Tokenizer:
        if given is not None:
            for _ in texts:  # the scan still counts the documents
                pass
            return given
        return train_bpe(texts, self.cfg.vocab_size)

    # -- pass 2 ------------------------------------------------------------------------------

    def tokenize(self) -> None:
        tokenizer = Tokenizer.from_file(str(self.cache / "tokenizer.json"))
        rule, state = SplitRule(**self.state["rule"]), self.state
        dtype = token_dtype_for(tokenizer.get_vocab_size())
        eot = np.array([eot_id(tokenizer)], dtype=dtype)
        counts_path = self.cache / "train_counts.npy"
        train_counts = (np.load(counts_path) if state["docs_done"] else
                        np.zeros(tokenizer.get_vocab_size(), dtype=np.int64))
        progress = PrepareProgress("tokenizing", self.total_bytes)
        if state["docs_done"]:
            progress.message(f"data: resuming: {state['shards']} shards ({state['docs_done']:,} "
                             f"documents, {state['train_tokens'] + state['val_tokens']:,} "
                             "tokens) already tokenized")
        files = {}
        for split in ("train", "val"):
            path = self.cache / f"{split}.bin"
            with path.open("ab") as f:  # create, then cut back to the last commit
                f.truncate(state[f"{split}_tokens"] * dtype.itemsize)
            files[split] = path.open("ab")
        batch: list[tuple[int, Document]] = []
        batch_chars = shard_chars = 0

        def write_batch() -> None:
            texts = [doc.text for _, doc in batch if doc.text is not None]
            encodings = iter(tokenizer.encode_batch_fast(texts, add_special_tokens=False)
                             if texts else ())
            parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
            for index, doc in batch:
                ids = doc.ids if doc.ids is not None else next(encodings).ids
                parts["val" if rule.is_val(index, doc) else "train"] += [
                    np.asarray(ids, dtype=dtype), eot]
            for split, arrays in parts.items():
                if arrays:
                    tokens = np.concatenate(arrays)
                    files[split].write(tokens.data)
                    state[f"{split}_tokens"] += len(tokens)
                    progress.add_tokens(len(tokens))
                    if split == "train":
                        train_counts[:] += np.bincount(tokens, minlength=len(train_counts))

        def commit(docs_done: int) -> None:
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
            tmp = counts_path.with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, train_counts)
            os.replace(tmp, counts_path)
            state["docs_done"], state["shards"] = docs_done, state["shards"] + 1
            self.save_state()  # only now does a restart trust the tokens written so far

        try:
            for index, doc in self.documents(progress, tokenizer):
                if index < state["docs_done"]:
                    continue  # a finished shard of an interrupted preparation
                batch.append((index, doc))
                batch_chars += doc.size
                if batch_chars >= BATCH_CHARS:
                    write_batch()
                    shard_chars, batch, batch_chars = shard_chars + batch_chars, [], 0
                    if shard_chars >= SHARD_CHARS:
                        commit(index + 1)
                        shard_chars = 0
            write_batch()
            commit(state["docs"])
        finally:
            for f in files.values():
                f.close()
            progress.close()

    def finish(self) -> None:
        state = self.state
        meta = {"format": CACHE_FORMAT, "cache_key": self.cache.name,
                "sources": len(self.sources), "source_bytes": self.total_bytes,
                "dtype": token_dtype_for(
                    Tokenizer.from_file(str(self.cache / "tokenizer.json")).get_vocab_size()).name,
                **{k: state[k] for k in ("train_docs", "val_docs", "train_tokens", "val_tokens",
                                         "sample_chars")}}
        _write_json(self.cache / "meta.json", meta)  # last: its presence means complete
        self.state_path.unlink()


def build_cache(cfg: DataConfig, cache: Path) -> None:
    """Fill `cache` from `cfg`'s sources, resuming an interrupted preparation of the same key.
    The caller holds the cache's lock (corpus.cache_lock)."""
    preparation = Preparation(cfg, cache)
    cache.mkdir(parents=True, exist_ok=True)
    if "rule" not in preparation.state:  # the scan had not finished: it is quick to redo
        preparation.scan()
    preparation.tokenize()
    preparation.finish()
