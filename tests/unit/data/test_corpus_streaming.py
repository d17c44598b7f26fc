"""Streamed corpus preparation (data/prepare.py) against the in-memory algorithm it replaced.

Invariants:
- the streamed cache equals, token for token, the cache of the old in-memory algorithm (kept
  below as the oracle) on a corpus small enough for both: same documents (files read a block at
  a time, CRLF, blank and binary files, the end-of-text marker stripped), same split, same BPE
  (trained on all training documents when they are under data.bpe_sample_bytes), same ids;
  also when too few documents fall on each side and the last one is held out;
- the BPE sample is a seeded choice per document, of about the requested share, spread over the
  whole corpus, and its size in a real preparation is about data.bpe_sample_bytes;
- a preparation killed midway leaves no cache that a run would open (no meta.json); restarted,
  it keeps the finished shards and ends with the cache an uninterrupted one writes;
- peak memory of preparing a corpus 10x larger than a small one grows by less than 20%
  (measured in child processes; not a timing test);
- 2 torchrun ranks on a cold cache: one prepares it, both read the tokens one process writes;
- progress: a tqdm bar (bytes, tokens) on a terminal, plain lines with rate and time left elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bigbatch.config.sections import DataConfig
from bigbatch.data import prepare, sources
from bigbatch.data.corpus import cache_dir_for, is_cached, prepare_corpus
from bigbatch.data.prepare import in_bpe_sample
from bigbatch.data.sources import is_validation, source_files, split_text
from bigbatch.data.tokenizer import EOT, eot_id, train_bpe
from conftest import ROOT, SHARED

SHAKESPEARE = SHARED / "data/tinyshakespeare/input.txt"


def old_in_memory_cache(cfg: DataConfig) -> tuple[str, np.ndarray, np.ndarray]:
    """The pre-streaming corpus.py: every document in memory, BPE on all training documents,
    ids as lists. Returns (tokenizer JSON, train tokens, val tokens)."""
    docs, root = [], Path(cfg.path)
    for f in [s.path for s in source_files(cfg.path, cfg.pattern)]:
        name = f.relative_to(root).as_posix() if root.is_dir() else f.name
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text.replace(EOT, "")
        if not text.strip():
            continue
        docs += [(f"{name}#{i}", piece) for i, piece in enumerate(split_text(text, cfg.doc_chars))]
    train = [d for d in docs if not is_validation(d[0], cfg.val_fraction)]
    val = [d for d in docs if is_validation(d[0], cfg.val_fraction)]
    if len(docs) >= 2 and (not val or not train):
        train, val = docs[:-1], docs[-1:]
    tokenizer = train_bpe([text for _, text in train], cfg.vocab_size)
    eot = eot_id(tokenizer)

    def tokens(split):
        ids = [e.ids for e in tokenizer.encode_batch([t for _, t in split],
                                                     add_special_tokens=False)]
        return np.array([i for doc in ids for i in [*doc, eot]], dtype=np.int64)

    return tokenizer.to_str(), tokens(train), tokens(val)


def assert_same_cache(streamed, oracle) -> None:
    tokenizer_json, train, val = oracle
    assert streamed.tokenizer.to_str() == tokenizer_json
    assert np.array_equal(np.asarray(streamed.train_tokens, dtype=np.int64), train)
    assert np.array_equal(np.asarray(streamed.val_tokens, dtype=np.int64), val)


@pytest.fixture
def small_pieces(monkeypatch):
    """Blocks, batches and shards far smaller than a test corpus, so every boundary is crossed."""
    monkeypatch.setattr(sources, "TEXT_BLOCK_BYTES", 40_000)
    monkeypatch.setattr(prepare, "BATCH_CHARS", 30_000)
    monkeypatch.setattr(prepare, "SHARD_CHARS", 100_000)


def mixed_text_dir(root: Path) -> Path:
    text = SHAKESPEARE.read_text()
    root.mkdir()
    (root / "big.txt").write_text("\n\n" + text[:250_000] + EOT + text[250_000:400_000])
    (root / "crlf.txt").write_bytes(text[400_000:460_000].replace("\n", "\r\n").encode())
    (root / "blank.txt").write_text("  \n\n \n")
    (root / "binary.dat").write_bytes(bytes(range(256)) * 40)
    (root / "sub").mkdir()
    for i in range(12):
        start = 500_000 + 3000 * i
        (root / "sub" / f"part{i}.txt").write_text(text[start:start + 3000])
    return root


def test_streamed_cache_equals_the_in_memory_cache(tmp_path, small_pieces):
    cfg = DataConfig(path=str(mixed_text_dir(tmp_path / "corpus")), vocab_size=400,
                     doc_chars=4096, cache_dir=str(tmp_path / "cache"))
    streamed = prepare_corpus(cfg)
    assert json.loads((streamed.cache_dir / "meta.json").read_text())["train_docs"] > 50
    assert_same_cache(streamed, old_in_memory_cache(cfg))
    counts = np.bincount(streamed.train_tokens, minlength=streamed.vocab_size)
    assert np.array_equal(streamed.train_counts, counts)  # the stored unigram counts


def test_a_moved_corpus_keeps_its_split_its_bpe_sample_and_its_tokens(tmp_path, small_pieces):
    """Documents are named by their path inside data.path: a corpus copied elsewhere (another
    machine, or each node of a cluster mounting it at its own path) gives the same cache. Named
    by absolute path, as before, the hash split held out other documents at each location."""
    import shutil

    here = mixed_text_dir(tmp_path / "here")
    there = tmp_path / "elsewhere" / "deeper" / "corpus"
    shutil.copytree(here, there.parent / "corpus")
    corpora = [prepare_corpus(DataConfig(path=str(root), vocab_size=400, doc_chars=4096,
                                         cache_dir=str(tmp_path / f"cache{i}")))
               for i, root in enumerate((here, there))]
    assert corpora[0].cache_dir.name != corpora[1].cache_dir.name  # two caches, each prepared
    assert corpora[0].tokenizer.to_str() == corpora[1].tokenizer.to_str()
    assert np.array_equal(corpora[0].train_tokens, corpora[1].train_tokens)
    assert np.array_equal(corpora[0].val_tokens, corpora[1].val_tokens)
    assert corpora[0].val_tokens.size > 0


def test_too_few_documents_hold_out_the_last_one_as_before(tmp_path, small_pieces):
    root = tmp_path / "three"
    root.mkdir()
    text = SHAKESPEARE.read_text()
    for i in range(3):
        (root / f"doc{i}.txt").write_text(text[2000 * i:2000 * (i + 1)])
    cfg = DataConfig(path=str(root), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    names = [f"{s.path.name}#0" for s in source_files(cfg.path, cfg.pattern)]
    assert not any(is_validation(n, cfg.val_fraction) for n in names)  # the hash holds none out
    streamed = prepare_corpus(cfg)
    assert_same_cache(streamed, old_in_memory_cache(cfg))
    assert len(streamed.val_tokens) > 100


def test_bpe_sample_is_seeded_about_its_share_and_spread_over_the_corpus():
    names = [f"/corpus/file{i // 7}.txt#{i % 7}" for i in range(40_000)]
    chosen = np.array([in_bpe_sample(n, 0.1) for n in names])
    assert chosen.tolist() == [in_bpe_sample(n, 0.1) for n in names]  # seeded: the same again
    for part in np.array_split(chosen, 4):  # every quarter of the corpus, not just its start
        assert 0.09 < part.mean() < 0.11
    assert all(in_bpe_sample(n, 1.0) for n in names[:100])
    # independent of the validation hash: the sample holds validation documents' share too
    val = np.array([is_validation(n, 0.05) for n in names])
    assert 0.09 < chosen[val].mean() < 0.11


def corpus_of(root: Path, num_bytes: int) -> Path:
    """`num_bytes` of Shakespeare in files of ~64 KB, each copy varied (numbered lines) so the
    BPE and the ids differ from copy to copy."""
    root.mkdir()
    text, written, copy = SHAKESPEARE.read_text(), 0, 0
    while written < num_bytes:
        lines = text.splitlines(keepends=True)
        varied = "".join(f"{copy}.{i} {line}" if i % 5 == 0 else line
                         for i, line in enumerate(lines))
        for start in range(0, len(varied), 65536):
            if written >= num_bytes:
                break
            piece = varied[start:start + 65536]
            (root / f"c{copy:03d}_{start // 65536:03d}.txt").write_text(piece)
            written += len(piece)
        copy += 1
    return root


CHILD = """
import json, resource, sys
from bigbatch.config.sections import DataConfig
from bigbatch.data import prepare, sources
from bigbatch.data.corpus import prepare_corpus
sources.TEXT_BLOCK_BYTES, prepare.BATCH_CHARS, prepare.SHARD_CHARS = {pieces}
corpus = prepare_corpus(DataConfig(**json.loads(sys.argv[1])))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def child_prepare(cfg: DataConfig, pieces=(1 << 16, 1 << 16, 1 << 18)) -> subprocess.Popen:
    from dataclasses import asdict

    return subprocess.Popen([sys.executable, "-c", CHILD.format(pieces=pieces),
                             json.dumps(asdict(cfg))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # a child process killed mid-preparation
def test_killed_preparation_is_never_loaded_and_resumes_to_the_same_cache(tmp_path, capfd):
    root = corpus_of(tmp_path / "corpus", 3_000_000)
    cfg = DataConfig(path=str(root), vocab_size=300, cache_dir=str(tmp_path / "killed"),
                     bpe_sample_bytes="1MiB")
    state = cache_dir_for(cfg) / "progress.json"
    child = child_prepare(cfg)
    deadline = time.monotonic() + 120
    while not (state.is_file() and json.loads(state.read_text())["shards"] >= 2):
        assert child.poll() is None, child.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    kept = json.loads(state.read_text())
    assert not is_cached(cfg) and not (cache_dir_for(cfg) / "meta.json").exists()
    assert 2 <= kept["shards"] and kept["docs_done"] < kept["docs"]

    capfd.readouterr()
    resumed = prepare_corpus(cfg)  # a run asking for the corpus now resumes, never loads it
    assert f"resuming: {kept['shards']} shards ({kept['docs_done']:,} documents" in \
        capfd.readouterr().err
    whole = child_prepare(DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "whole")}))
    assert whole.wait() == 0, whole.stderr.read()
    uninterrupted = prepare_corpus(DataConfig(**{**cfg.__dict__,
                                                 "cache_dir": str(tmp_path / "whole")}))
    assert resumed.tokenizer.to_str() == uninterrupted.tokenizer.to_str()
    assert np.array_equal(resumed.train_tokens, uninterrupted.train_tokens)
    assert np.array_equal(resumed.val_tokens, uninterrupted.val_tokens)
    assert np.array_equal(resumed.train_counts, uninterrupted.train_counts)
    # The sample is about data.bpe_sample_bytes of the 3 MB corpus, not all of it.
    sample = json.loads((resumed.cache_dir / "meta.json").read_text())["sample_chars"]
    assert 0.75 * 2**20 < sample < 1.25 * 2**20


@pytest.mark.slow  # child processes preparing two corpora
def test_peak_memory_of_a_10x_larger_corpus_grows_less_than_20_percent(tmp_path):
    """Same batch, shard and BPE-sample sizes, 1 MB against 10 MB of text: with memory that
    grows with the corpus (the old lists of ids: ~150 B a token) the large one would need
    hundreds of MB more."""
    peaks = {}
    for name, size in (("small", 1_000_000), ("large", 10_000_000)):
        cfg = DataConfig(path=str(corpus_of(tmp_path / name, size)), vocab_size=1024,
                         bpe_sample_bytes="1MiB", cache_dir=str(tmp_path / f"cache-{name}"))
        child = child_prepare(cfg, pieces=(1 << 16, 1 << 17, 1 << 19))
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        peaks[name] = int(out.split()[-1]) / 1024  # MiB
        assert prepare_corpus(cfg).train_tokens.size > size / 5  # it did tokenize it all
    assert peaks["large"] < 1.2 * peaks["small"], peaks


@pytest.mark.slow  # torchrun: 2 ranks
def test_two_ranks_on_a_cold_cache_prepare_it_once_and_read_the_same_corpus(tmp_path):
    """Under torchrun every rank asks for the corpus at once; the cache's lock lets one of them
    prepare it (in its child process) while the other waits, and both read the same tokens an
    in-process preparation writes."""
    from dataclasses import asdict

    from corpus_dist_worker import corpus_digest

    root = corpus_of(tmp_path / "corpus", 600_000)
    cfg = DataConfig(path=str(root), vocab_size=300, cache_dir=str(tmp_path / "shared-cache"))
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "tests/corpus_dist_worker.py",
                           json.dumps(asdict(cfg)), str(out)],
                          cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    oracle = prepare_corpus(DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "one")}))
    assert [r["digest"] for r in ranks] == [corpus_digest(oracle)] * 2
    assert ranks[0]["cache"] == ranks[1]["cache"] == str(cache_dir_for(cfg))
    log = proc.stdout + proc.stderr
    # One preparation: one scan summary. (Progress lines are not counted: their number depends
    # on the clock and on the split, whose hash of document names here includes tmp_path.)
    assert log.count("data: scan done") == 1, log


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere():
    import io

    from bigbatch.data.progress import PrepareProgress

    plain = io.StringIO()
    progress = PrepareProgress("tokenizing", total_bytes=4 << 20, stream=plain, every_s=0.0)
    progress.add_tokens(123_456)
    progress.add_bytes(1 << 20)
    progress.close()
    first, last = plain.getvalue().splitlines()
    assert re.match(r"data: tokenizing 1\.00 MiB / 4\.00 MiB \(25%\) \| 123,456 tokens \| "
                    r".*/s \| \d+s elapsed, \d+s left$", first), first
    assert "\r" not in plain.getvalue() and last.startswith("data: tokenizing 1.00 MiB")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    progress = PrepareProgress("tokenizing", total_bytes=4 << 20, stream=terminal)
    progress.add_tokens(99)
    progress.add_bytes(2 << 20)
    progress.close()
    assert "\r" in terminal.getvalue() and "99 tokens" in terminal.getvalue()
    assert re.search(r"50%\|.*2\.00M/4\.00M", terminal.getvalue())
