"""Sources -> tokens: prepared once (streamed, prepare.py) into memory-mapped arrays cached for
later runs.

The cache key covers the source files (paths, sizes, mtimes), the split and chunking settings and
the tokenizer, so a changed corpus or setting never reuses stale tokens. Documents are joined with
the end-of-text token; `packing.py` masks the targets that would cross from one to the next.
A cache is filled under a file lock: of all the processes that want it at once (the ranks of a
torchrun job, two runs started together) one prepares it and the others wait, then read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from bigbatch.config.sections import DataConfig
from bigbatch.config.units import parse_bytes
from bigbatch.data.prepare import CACHE_FORMAT, build_cache
from bigbatch.data.sources import source_files, sources_fingerprint
from bigbatch.data.tokenizer import eot_id
from bigbatch.errors import UsageError

COUNT_CHUNK = 1 << 24  # tokens counted at a time when no counts were stored
USAGE_ERROR = "bigbatch-usage-error: "  # the child's stdout line that carries a UsageError back


@dataclass
class Corpus:
    tokenizer: Tokenizer
    train_tokens: np.ndarray  # 1-D memmap, documents separated by the end-of-text token
    val_tokens: np.ndarray
    eot_id: int
    cache_dir: Path
    train_counts: np.ndarray | None = None  # occurrences of each token id in train_tokens

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def unigram_loss(self, targets: np.ndarray) -> float:
        """The loss (nats/token) on `targets` of a model that learned nothing but the training
        split's token frequencies: the baseline a validation loss must beat. Add-one smoothed,
        so a token never seen in training costs a finite amount."""
        counts = self.train_counts
        if counts is None:  # chunked: bincount of a whole memmap would copy it as int64
            counts = np.zeros(self.vocab_size, dtype=np.int64)
            for start in range(0, len(self.train_tokens), COUNT_CHUNK):
                chunk = self.train_tokens[start:start + COUNT_CHUNK]
                counts += np.bincount(chunk, minlength=self.vocab_size)[:self.vocab_size]
        counts = counts.astype(np.float64)
        log_probs = np.log(counts + 1.0) - np.log(counts.sum() + self.vocab_size)
        return float(-log_probs[targets].mean())


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bigbatch"


def cache_dir_for(cfg: DataConfig) -> Path:
    """The cache directory of `cfg`'s tokens: keyed by sources, split settings and tokenizer."""
    sources = source_files(cfg.path, cfg.pattern)
    settings = (f"v{CACHE_FORMAT}|{sources_fingerprint([s.path for s in sources])}|"
                f"{cfg.doc_chars}|{cfg.val_fraction}")
    if sources[0].kind not in ("text", "tokens"):
        settings += f"|field:{cfg.text_field}"
    if cfg.tokenizer:
        tokenizer_dir = Path(cfg.tokenizer).expanduser()
        tok_files = sorted(p for p in tokenizer_dir.glob("*") if p.is_file())
        settings += f"|tok:{sources_fingerprint(tok_files)}"
    else:
        sample = parse_bytes(cfg.bpe_sample_bytes, "data.bpe_sample_bytes")
        settings += f"|bpe:{cfg.vocab_size}:{sample}"
    key = hashlib.sha256(settings.encode()).hexdigest()[:20]
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    return cache / key


def is_complete(cache: Path) -> bool:
    return (cache / "meta.json").is_file()


def is_cached(cfg: DataConfig) -> bool:
    return is_complete(cache_dir_for(cfg))


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Hold `cache`'s lock file (beside it): one preparation of a cache at a time.

    flock is released by the kernel when its holder dies, so a killed preparation never leaves
    the others waiting; they find no meta.json and resume it themselves.
    """
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f"{cache.name}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            print(f"data: waiting for process {holder}, which is preparing {cache}",
                  file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_cache(cache: Path) -> Corpus:
    """The corpus of a complete cache, memory-mapped."""
    meta = json.loads((cache / "meta.json").read_text())
    tokenizer = Tokenizer.from_file(str(cache / "tokenizer.json"))
    arrays = {}
    for split in ("train", "val"):
        path, length = cache / f"{split}.bin", meta[f"{split}_tokens"]
        dtype = np.dtype(meta["dtype"])
        if path.stat().st_size != length * dtype.itemsize:
            raise UsageError(f"the corpus cache {cache} is damaged ({path.name} is not "
                             f"{length:,} tokens long): delete that directory to rebuild it")
        arrays[split] = np.memmap(path, dtype=dtype, mode="r", shape=(length,))
    return Corpus(tokenizer=tokenizer, train_tokens=arrays["train"], val_tokens=arrays["val"],
                  eot_id=eot_id(tokenizer), cache_dir=cache,
                  train_counts=np.load(cache / "train_counts.npy"))


def prepare_corpus(cfg: DataConfig) -> Corpus:
    """Prepare the cache (in this process) unless it is there already, then open it."""
    cache = cache_dir_for(cfg)
    if not is_complete(cache):
        with cache_lock(cache):
            if not is_complete(cache):  # another process may have finished it meanwhile
                build_cache(cfg, cache)
    return open_cache(cache)


def prepare_corpus_in_child(cfg: DataConfig) -> Corpus:
    """`prepare_corpus`, with a cold cache filled by a fresh child process.

    Training the BPE and tokenizing allocate and free hundreds of MiB; under the tuned allocator
    (allocator.py) that memory would stay in the training process's heap as holes its tensors
    cannot reuse, and the run's peak would exceed what the planner's probes measured (even after
    malloc_trim; BENCHMARKS.md, "Numbers that were in docstrings"). A child's memory is gone
    when it exits. The child's stderr is this process's, so its progress bar shows (and the
    traceback of a bug in it); its stdout carries a UsageError's one line back (USAGE_ERROR), so
    bad data is the same one-line error, exit 2, whichever process read it.
    """
    cache = cache_dir_for(cfg)
    if not is_complete(cache):
        with cache_lock(cache):
            if not is_complete(cache):
                _build_in_child(cfg, cache)
    return open_cache(cache)


def _build_in_child(cfg: DataConfig, cache: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bigbatch.data.corpus",
                           json.dumps(dataclasses.asdict(cfg)), str(cache)],
                          stdout=subprocess.PIPE, text=True)
    carried = [line[len(USAGE_ERROR):] for line in done.stdout.splitlines()
               if line.startswith(USAGE_ERROR)]
    if done.returncode == 2 and carried:  # the child's UsageError
        raise UsageError(json.loads(carried[-1]))
    if done.returncode != 0:
        raise RuntimeError(f"preparing data.path = {cfg.path!r} failed in its child process "
                           f"(exit {done.returncode}; its traceback is above)")


def _child_main(cfg_json: str, cache: str) -> int:
    """Fill `cache`; a UsageError is one USAGE_ERROR line on stdout and exit 2 (with its
    traceback on stderr under --debug), anything else a traceback and exit 1."""
    try:  # the parent holds the cache's lock
        build_cache(DataConfig(**json.loads(cfg_json)), Path(cache))
    except UsageError as err:
        if os.environ.get("BIGBATCH_DEBUG"):
            traceback.print_exc()
        print(USAGE_ERROR + json.dumps(str(err)), flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1], sys.argv[2]))
