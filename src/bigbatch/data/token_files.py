"""Pre-tokenized sources: `.npy` arrays and the flat `.bin` files of nanoGPT and llm.c.

A `.bin` is either raw little-endian ids (nanoGPT's `prepare.py`: uint16, or uint32 for a
vocabulary over 65,536) or llm.c's: a 256 x int32 header (magic 20240520, version 1 = uint16 /
2 = uint32, token count) and then the ids. The ids between end-of-text tokens are one document,
so such a stream splits into training and validation by document like text does. Files are read
with ordinary reads a chunk at a time, not memory-mapped: mapped pages read would stay resident.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bigbatch.data.documents import Document, OnBytes, SourceFile, reading
from bigbatch.errors import UsageError

LLMC_MAGIC = 20240520
LLMC_HEADER_BYTES = 256 * 4
LLMC_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
CHUNK_TOKENS = 1 << 22
MAX_DOC_TOKENS = 1 << 20  # a longer run without end-of-text is cut, as a long text file is


def token_dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2" if vocab_size <= 2**16 else "<u4")


def token_file_layout(path: Path, vocab_size: int) -> tuple[np.dtype, int, int]:
    """(dtype, byte offset of the first id, number of ids) of a token file."""
    size = path.stat().st_size
    with reading(path):
        f = path.open("rb")
    with f:
        if path.name.lower().endswith(".npy"):
            try:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}[version]
                shape, _fortran, dtype = read_header(f)
            except (ValueError, KeyError) as err:
                raise UsageError(f"{path}: not a .npy array ({err})") from None
            if len(shape) != 1 or dtype.kind not in "ui":
                raise UsageError(f"{path}: a .npy of shape {shape} and dtype {dtype}: expected a "
                                 "1-D array of integer token ids")
            return dtype, f.tell(), shape[0]
        header = np.frombuffer(f.read(LLMC_HEADER_BYTES).ljust(12, b"\0"), "<i4", count=3)
    if header[0] == LLMC_MAGIC:
        if int(header[1]) not in LLMC_DTYPES:
            raise UsageError(f"{path}: llm.c token file of version {header[1]}: expected "
                             f"version {' or '.join(map(str, LLMC_DTYPES))}")
        dtype = LLMC_DTYPES[int(header[1])]
        if LLMC_HEADER_BYTES + int(header[2]) * dtype.itemsize != size:
            raise UsageError(f"{path}: llm.c header says {header[2]} tokens, but the file holds "
                             f"{(size - LLMC_HEADER_BYTES) // dtype.itemsize}: truncated?")
        return dtype, LLMC_HEADER_BYTES, int(header[2])
    dtype = token_dtype_for(vocab_size)
    if size % dtype.itemsize:
        raise UsageError(f"{path}: {size} bytes is not a whole number of {dtype.name} token ids "
                         f"(the width for data.tokenizer's vocabulary of {vocab_size})")
    return dtype, 0, size // dtype.itemsize


def read_token_file(source: SourceFile, vocab_size: int, eot: int, on_bytes: OnBytes
                    ) -> Iterator[Document]:
    """The documents of a token file: runs of ids, each ending at an end-of-text token (which
    is dropped: the writer appends one to every document)."""
    dtype, offset, count = token_file_layout(source.path, vocab_size)
    on_bytes(offset)
    pending, index = np.empty(0, dtype=np.int64), 0
    with reading(source.path), source.path.open("rb") as f:
        f.seek(offset)
        for start in range(0, count, CHUNK_TOKENS):
            chunk = np.fromfile(f, dtype=dtype, count=min(CHUNK_TOKENS, count - start))
            on_bytes(chunk.nbytes)
            _check_ids(source.path, chunk, start, vocab_size)
            stream = np.concatenate([pending, chunk.astype(np.int64)])
            ends = np.flatnonzero(stream == eot)
            begin = 0
            for end in ends:
                for piece in _pieces(stream[begin:end]):
                    yield Document(source.document_name(index), ids=piece, split=source.split)
                    index += 1
                begin = end + 1
            pending = stream[begin:]
            while len(pending) > MAX_DOC_TOKENS:
                yield Document(source.document_name(index), ids=pending[:MAX_DOC_TOKENS].copy(),
                               split=source.split)
                pending, index = pending[MAX_DOC_TOKENS:], index + 1
    for piece in _pieces(pending):
        yield Document(source.document_name(index), ids=piece, split=source.split)
        index += 1


def _check_ids(path: Path, chunk: np.ndarray, start: int, vocab_size: int) -> None:
    """Every id of `chunk` (the ids from position `start` of the file) is in the vocabulary."""
    if not chunk.size:
        return
    low, high = int(chunk.min()), int(chunk.max())
    if low >= 0 and high < vocab_size:
        return
    bad = low if low < 0 else high
    position = start + int(np.argmax(chunk == bad))
    raise UsageError(f"{path}: token id {bad} is outside data.tokenizer's vocabulary of "
                     f"{vocab_size} (valid ids are 0 to {vocab_size - 1}), at position "
                     f"{position:,}: is it the tokenizer that made these ids?")


def _pieces(ids: np.ndarray) -> list[np.ndarray]:
    """A document's ids cut into pieces of at most MAX_DOC_TOKENS; an empty run is no document
    (llm.c puts the end-of-text token before each document, nanoGPT after it)."""
    return [ids[i:i + MAX_DOC_TOKENS].copy() for i in range(0, len(ids), MAX_DOC_TOKENS)]
