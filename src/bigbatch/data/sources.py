"""Where text comes from: one file, a directory, or the embedded default corpus.

The embedded default is the running Python's own standard-library sources (tests excluded): real
text on every machine, offline. Files longer than `doc_chars` are cut at line breaks into several
documents so that even a single file splits into training and validation by document.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bigbatch.errors import UsageError

# Directories of the standard library that hold its test suite or vendored packages.
_STDLIB_EXCLUDED = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        # Prune while walking: site-packages alone can hold far more files than the stdlib.
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_EXCLUDED]
        files.extend(Path(directory, n) for n in names if n.endswith(".py"))
    return sorted(files)


def source_files(path: str, pattern: str) -> list[Path]:
    """The files a `data.path` names, sorted so that every run sees the same order."""
    if not path:
        return stdlib_files()
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.rglob(pattern) if p.is_file())
        if not files:
            raise UsageError(f"data.path = {path!r} holds no files matching data.pattern = "
                             f"{pattern!r}: point it at a text file or a directory of them")
        return files
    raise UsageError(f"data.path = {path!r} does not exist: give a text file, a directory, or "
                     "\"\" for the embedded standard-library corpus")


def sources_fingerprint(files: list[Path]) -> str:
    """Changes whenever a file is added, removed, resized or touched."""
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def split_text(text: str, doc_chars: int) -> list[str]:
    """Cut `text` at line breaks into pieces of about `doc_chars` characters (pure)."""
    if len(text) <= doc_chars:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + doc_chars)
        end = len(text) if end == -1 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def read_documents(files: list[Path], doc_chars: int, strip: str) -> Iterator[Document]:
    """Each file's text (undecodable files skipped), with `strip` removed, cut into documents."""
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable files in a directory are not text to learn from
        text = text.replace(strip, "")
        if not text.strip():
            continue
        for i, piece in enumerate(split_text(text, doc_chars)):
            yield Document(f"{f}#{i}", piece)


def is_validation(doc_name: str, val_fraction: float) -> bool:
    """Deterministic split by document: a hash of its name, not its position."""
    bucket = int(hashlib.sha1(doc_name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < val_fraction


def split_documents(docs: list[Document], val_fraction: float
                    ) -> tuple[list[Document], list[Document]]:
    train = [d for d in docs if not is_validation(d.name, val_fraction)]
    val = [d for d in docs if is_validation(d.name, val_fraction)]
    if len(docs) >= 2 and (not val or not train):
        # Too few documents for the fraction to land one on each side: hold out the last one.
        train, val = docs[:-1], docs[-1:]
    return train, val
