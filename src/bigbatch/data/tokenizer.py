"""Tokenizers: a byte-level BPE trained with Hugging Face `tokenizers`, or a local one loaded.

A trained tokenizer is cached with the corpus's tokens (prepare.py), so a second run on the same
corpus reuses it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bigbatch.data.documents import one_line
from bigbatch.errors import UsageError

EOT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on `texts`, consumed as a stream (the trainer keeps only word
    counts, so a generator over a corpus sample never has to be held in memory)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer_dir(directory: str) -> Tokenizer:
    """A directory with `tokenizer.json`, or a GPT-2 style `vocab.json` + `merges.txt`."""
    root = Path(directory).expanduser()
    if (root / "tokenizer.json").is_file():
        tokenizer = _loaded(directory, lambda: Tokenizer.from_file(str(root / "tokenizer.json")))
    elif (root / "vocab.json").is_file() and (root / "merges.txt").is_file():
        tokenizer = _loaded(directory, lambda: Tokenizer(models.BPE.from_file(
            str(root / "vocab.json"), str(root / "merges.txt"))))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    else:
        raise UsageError(f"data.tokenizer = {directory!r} is not a tokenizer directory: it needs "
                         "tokenizer.json, or vocab.json and merges.txt")
    if tokenizer.token_to_id(EOT) is None:
        tokenizer.add_special_tokens([EOT])
    return tokenizer


def _loaded(directory: str, load: Callable[[], Tokenizer]) -> Tokenizer:
    try:
        return load()
    except Exception as err:  # tokenizers raises plain Exceptions: unreadable, broken JSON
        raise UsageError(f"data.tokenizer = {directory!r}: its files cannot be loaded "
                         f"({one_line(err)}): expected readable tokenizer.json, or vocab.json "
                         "and merges.txt, as Hugging Face tokenizers writes them") from None


def eot_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOT)
    assert token_id is not None, "every bigbatch tokenizer carries the end-of-text token"
    return token_id


def save_atomically(tokenizer: Tokenizer, path: Path) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
