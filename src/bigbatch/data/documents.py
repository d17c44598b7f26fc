"""What the readers of data/sources.py, formats.py and token_files.py hand on: documents, and
the source files they come from, and the one way a file that cannot be read is said."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigbatch.errors import UsageError

OnBytes = Callable[[int], None]  # told how many source bytes were just consumed (progress)


@dataclass(frozen=True)
class Document:
    name: str                      # SourceFile.document_name: the split hashes it
    text: str | None = None        # text to tokenize, or
    ids: np.ndarray | None = None  # the token ids of a pre-tokenized source
    split: str | None = None       # "train" or "val" where the source's layout says

    @property
    def size(self) -> int:
        """Characters (or tokens): what batches and shards are measured in."""
        return len(self.text) if self.text is not None else len(self.ids)


@dataclass(frozen=True)
class SourceFile:
    path: Path
    kind: str                  # "text" | "jsonl" | "parquet" | "arrow" | "tokens"
    split: str | None = None   # "train" or "val" where the layout fixes it (val.bin, DatasetDict)
    name: str = ""             # its path relative to data.path (source_files sets it)

    def document_name(self, index: int) -> str:
        """"FILE#N" with FILE relative to data.path. The split and the BPE sample hash this
        name, so it must not hold where the corpus lies: a corpus moved, or mounted at another
        path on each node of a cluster, keeps the same validation documents."""
        return f"{self.name or self.path.name}#{index}"


def one_line(err: BaseException) -> str:
    """A library's error message on one line (pyarrow's run over several)."""
    return " ".join(str(err).split())


def cannot_read(path: Path, err: OSError) -> UsageError:
    """The one-line error of a source file the operating system will not hand over."""
    reason = (err.strerror or one_line(err)).lower()
    fix = ("make it readable by the user running bigbatch (chmod a+r, a+rx for a directory), "
           "or leave it out with data.path / data.pattern" if isinstance(err, PermissionError) else
           "expected a readable file")
    return UsageError(f"{path}: cannot be read ({reason}): {fix}")


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """An OSError while opening or reading `path` (no permission, gone, a directory, an I/O
    error) becomes `cannot_read`'s one line naming the file."""
    try:
        yield
    except OSError as err:
        raise cannot_read(path, err) from None
