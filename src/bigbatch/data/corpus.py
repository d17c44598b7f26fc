"""Sources -> tokens: tokenize once, in parallel, into memory-mapped arrays cached for later runs.

The cache key covers the source files (paths, sizes, mtimes), the split and chunking settings and
the tokenizer, so a changed corpus or setting never reuses stale tokens. Documents are joined with
the end-of-text token; `packing.py` masks the targets that would cross from one to the next.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from bigbatch.config.sections import DataConfig
from bigbatch.data.sources import read_documents, source_files, sources_fingerprint, split_documents
from bigbatch.data.tokenizer import EOT, eot_id, load_tokenizer_dir, save_atomically, train_bpe
from bigbatch.errors import UsageError


@dataclass
class Corpus:
    tokenizer: Tokenizer
    train_tokens: np.ndarray  # 1-D memmap, documents separated by the end-of-text token
    val_tokens: np.ndarray
    eot_id: int
    cache_dir: Path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def unigram_loss(self, targets: np.ndarray) -> float:
        """The loss (nats/token) on `targets` of a model that learned nothing but the training
        split's token frequencies: the baseline a validation loss must beat. Add-one smoothed,
        so a token never seen in training costs a finite amount."""
        counts = np.bincount(self.train_tokens, minlength=self.vocab_size).astype(np.float64)
        log_probs = np.log(counts + 1.0) - np.log(counts.sum() + self.vocab_size)
        return float(-log_probs[targets].mean())


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bigbatch"


def _write_tokens(path: Path, ids: list[list[int]], eot: int, dtype: np.dtype) -> None:
    """Concatenate documents with a trailing end-of-text token each, write atomically."""
    total = sum(len(doc) + 1 for doc in ids)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,))
    position = 0
    for doc in ids:
        array[position:position + len(doc)] = doc
        array[position + len(doc)] = eot
        position += len(doc) + 1
    array.flush()
    del array
    os.replace(tmp, path)


def _tokenize(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    # encode_batch runs in parallel across the machine's cores (Rust threads).
    return [enc.ids for enc in tokenizer.encode_batch(texts, add_special_tokens=False)]


def cache_dir_for(cfg: DataConfig) -> Path:
    """The cache directory of `cfg`'s tokens: keyed by sources, split settings and tokenizer."""
    files = source_files(cfg.path, cfg.pattern)
    settings = f"{sources_fingerprint(files)}|{cfg.doc_chars}|{cfg.val_fraction}"
    if cfg.tokenizer:
        tokenizer_dir = Path(cfg.tokenizer).expanduser()
        tok_files = sorted(p for p in tokenizer_dir.glob("*") if p.is_file())
        settings += f"|tok:{sources_fingerprint(tok_files)}"
    else:
        settings += f"|bpe:{cfg.vocab_size}"
    key = hashlib.sha256(settings.encode()).hexdigest()[:20]
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    return cache / key


def is_cached(cfg: DataConfig) -> bool:
    return (cache_dir_for(cfg) / "meta.json").is_file()


def _build_cache(cfg: DataConfig, cache: Path) -> None:
    files = source_files(cfg.path, cfg.pattern)
    cache.mkdir(parents=True, exist_ok=True)
    docs = list(read_documents(files, cfg.doc_chars, strip=EOT))
    if not docs:
        raise UsageError(f"data.path = {cfg.path!r} holds no readable text")
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    if not val_docs:
        raise UsageError(f"data.path = {cfg.path!r} is one document of "
                         f"{len(docs[0].text)} characters: too little to split; lower "
                         "data.doc_chars or give more text")
    if cfg.tokenizer:
        tokenizer = load_tokenizer_dir(cfg.tokenizer)
    else:
        tokenizer = train_bpe([d.text for d in train_docs], cfg.vocab_size)
    save_atomically(tokenizer, cache / "tokenizer.json")
    eot = eot_id(tokenizer)
    dtype = np.dtype(np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32)
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        _write_tokens(cache / f"{split}.npy", _tokenize(tokenizer, [d.text for d in split_docs]),
                      eot, dtype)
    meta = {"sources": len(files), "train_docs": len(train_docs), "val_docs": len(val_docs),
            "cache_key": cache.name}
    tmp = cache / "meta.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, cache / "meta.json")  # written last: its presence means the cache is complete


def prepare_corpus(cfg: DataConfig) -> Corpus:
    """Tokenize into the cache unless it is there already, then open it memory-mapped."""
    cache = cache_dir_for(cfg)
    if not (cache / "meta.json").is_file():
        _build_cache(cfg, cache)
    tokenizer = Tokenizer.from_file(str(cache / "tokenizer.json"))
    return Corpus(tokenizer=tokenizer,
                  train_tokens=np.load(cache / "train.npy", mmap_mode="r"),
                  val_tokens=np.load(cache / "val.npy", mmap_mode="r"),
                  eot_id=eot_id(tokenizer), cache_dir=cache)


def prepare_corpus_in_child(cfg: DataConfig) -> Corpus:
    """`prepare_corpus`, with a cold cache filled by a fresh child process.

    Training the BPE and tokenizing allocate and free hundreds of MiB; under the tuned allocator
    (allocator.py) that memory would stay in the training process's heap as holes its tensors
    cannot reuse, and the run's peak would exceed what the planner's probes measured (by 12%
    measured here, even after malloc_trim). A child's memory is gone when it exits.
    """
    if not is_cached(cfg):
        done = subprocess.run([sys.executable, "-m", "bigbatch.data.corpus",
                               json.dumps(dataclasses.asdict(cfg))],
                              capture_output=True, text=True)
        if done.returncode == 2:  # the child's UsageError, one line
            raise UsageError((done.stderr.strip().splitlines() or ["bad data settings"])[-1])
        if done.returncode != 0:
            raise RuntimeError(f"tokenizing data.path = {cfg.path!r} failed in its child "
                               f"process (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return prepare_corpus(cfg)


def _child_main(cfg_json: str) -> int:
    try:
        prepare_corpus(DataConfig(**json.loads(cfg_json)))
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
