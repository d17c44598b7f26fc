"""What the readers of data/sources.py, formats.py and token_files.py hand on: documents, and
the source files they come from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
