"""Where documents come from: text files, JSONL, Parquet, a `datasets` directory, token arrays.

`source_files` turns `data.path` into a list of `SourceFile`s of one kind; `iter_documents`
streams their documents in a fixed order, one bounded piece at a time, so no caller ever holds a
corpus whole. The embedded default is the running Python's own standard-library sources (tests
excluded): real text on every machine, offline. Text files longer than `doc_chars` are cut at line
breaks into several documents so that even a single file splits into training and validation by
document; a record of a JSONL, Parquet or `datasets` source is one document as it is.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from bigbatch.data import formats, token_files
from bigbatch.data.documents import Document, OnBytes, SourceFile, one_line, reading
from bigbatch.errors import UsageError

# Directories of the standard library that hold its test suite or vendored packages.
_STDLIB_EXCLUDED = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

# Kinds of source file by name; anything else in a directory is read as text.
SUFFIX_KINDS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet",
                ".npy": "tokens", ".bin": "tokens"}
STRUCTURED_KINDS = ("jsonl", "parquet", "tokens")
VAL_SPLIT_NAMES = ("validation", "valid", "val")  # a `datasets` DatasetDict's held-out split
TEXT_BLOCK_BYTES = 8 << 20  # a text file is read this much at a time (then to the next line)

def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        # Prune while walking: site-packages alone can hold far more files than the stdlib.
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_EXCLUDED]
        files.extend(Path(directory, n) for n in names if n.endswith(".py"))
    return sorted(files)


def file_kind(path: Path) -> str:
    name = path.name.lower()
    return next((k for s, k in SUFFIX_KINDS.items() if name.endswith(s)), "text")


def is_hf_dataset_dir(root: Path) -> bool:
    """A directory written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    return (root / "state.json").is_file() or (root / "dataset_dict.json").is_file()


def hf_dataset_files(root: Path) -> list[SourceFile]:
    """The Arrow files of a `save_to_disk` directory in row order. A DatasetDict contributes its
    train split, and its validation split (if it has one) as the held-out documents."""
    if (root / "dataset_dict.json").is_file():
        splits = _dataset_dict_splits(root / "dataset_dict.json")
        if "train" not in splits:
            raise UsageError(f"data.path = {str(root)!r} is a datasets DatasetDict with splits "
                             f"{splits}: it needs a \"train\" split")
        val = next((s for s in VAL_SPLIT_NAMES if s in splits), None)
        files = hf_dataset_files(root / "train")
        if val is None:
            return files
        return ([SourceFile(f.path, "arrow", "train") for f in files]
                + [SourceFile(f.path, "arrow", "val") for f in hf_dataset_files(root / val)])
    with reading(root / "state.json"):
        text = (root / "state.json").read_bytes()
    try:
        names = [str(entry["filename"]) for entry in json.loads(text)["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:  # UnicodeDecodeError is a ValueError
        raise UsageError(f"{root / 'state.json'}: not a datasets save_to_disk state file "
                         f"({one_line(err)}): expected {{\"_data_files\": [{{\"filename\": "
                         "...}]}") from None
    for name in names:
        if not (root / name).is_file():
            raise UsageError(f"{root / name}: missing, though {root / 'state.json'} lists it: "
                             "a datasets save_to_disk directory needs every Arrow file it "
                             "lists; save the dataset again or restore the file")
    return [SourceFile(root / n, "arrow") for n in names]


def _dataset_dict_splits(path: Path) -> list[str]:
    """The split names a DatasetDict's dataset_dict.json lists."""
    with reading(path):
        text = path.read_bytes()
    try:
        splits = json.loads(text)["splits"]
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise TypeError(f"splits is {splits!r}")
    except (ValueError, KeyError, TypeError) as err:  # UnicodeDecodeError is a ValueError
        raise UsageError(f"{path}: not a datasets DatasetDict file ({one_line(err)}): expected "
                         '{"splits": ["train", ...]} as save_to_disk writes it') from None
    return splits


def source_files(path: str, pattern: str) -> list[SourceFile]:
    """`found_source_files`, each named by its path relative to `data.path` (or to the
    standard library): what its documents are named by (SourceFile.document_name)."""
    if not path:
        root = Path(sysconfig.get_paths()["stdlib"])
    else:
        root = Path(path).expanduser()
        with reading(root):  # a directory above it may not be searchable
            root = root.parent if root.is_file() else root
    return [replace(f, name=f.path.relative_to(root).as_posix()) for f in
            found_source_files(path, pattern)]


def found_source_files(path: str, pattern: str) -> list[SourceFile]:
    """The files a `data.path` names, of one kind, sorted so that every run sees the same order.

    In a directory the structured files (JSONL, Parquet, token arrays) win over loose text: a
    folder of Parquet shards with a README reads the shards only. Token files whose name says
    "val" (nanoGPT's val.bin, llm.c's *_val_*.bin) are the validation split.
    """
    if not path:
        return [SourceFile(f, "text") for f in stdlib_files()]
    root = Path(path).expanduser()
    with reading(root):  # it, or a directory above it, may refuse us
        is_file, is_dir = root.is_file(), root.is_dir()
        if is_dir:
            os.scandir(root).close()  # a directory we may not list would look empty
            is_hf = is_hf_dataset_dir(root)
    if is_file:
        return [SourceFile(root, file_kind(root))]
    if not is_dir:
        raise UsageError(f"data.path = {path!r} does not exist: give a text, .jsonl(.gz), "
                         ".parquet, .npy or .bin file, a directory of them, a datasets "
                         "save_to_disk directory, or \"\" for the embedded standard-library corpus")
    if is_hf:
        return hf_dataset_files(root)
    files = sorted(p for p in root.rglob(pattern) if p.is_file())
    kinds = {file_kind(p) for p in files} & set(STRUCTURED_KINDS)
    if len(kinds) > 1:
        raise UsageError(f"data.path = {path!r} mixes {' and '.join(sorted(kinds))} files: "
                         "narrow data.pattern (e.g. \"*.parquet\") to one kind")
    kind = kinds.pop() if kinds else "text"
    chosen = [SourceFile(p, kind) for p in files if file_kind(p) == kind]
    if not chosen:
        raise UsageError(f"data.path = {path!r} holds no files matching data.pattern = "
                         f"{pattern!r}: point it at a text file or a directory of them")
    if kind == "tokens" and any(names_validation(f.path) for f in chosen):
        chosen = [SourceFile(f.path, kind, "val" if names_validation(f.path) else "train")
                  for f in chosen]
    return chosen


def names_validation(path: Path) -> bool:
    """val.bin, fineweb_val_000000.bin, validation.npy; not interval.bin."""
    return bool(set(re.split(r"[^a-z0-9]+", path.name.lower())) & set(VAL_SPLIT_NAMES))


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


def is_utf8_text(path: Path) -> bool:
    """Whether the file's first block decodes as UTF-8: binary files in a directory do not."""
    with reading(path), path.open("rb") as f:
        head = f.read(TEXT_BLOCK_BYTES)
    try:
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        decoder.decode(head, final=len(head) < TEXT_BLOCK_BYTES)
    except UnicodeDecodeError:
        return False
    return True


def text_file_pieces(path: Path, doc_chars: int, strip: str, on_bytes: OnBytes
                     ) -> Iterator[str]:
    """`split_text` of the file's text with `strip` removed, read a block at a time.

    The pieces are exactly those of `split_text` on the whole text (read as `Path.read_text`
    does: universal newlines). A file that is not UTF-8 at its start is binary and yields
    nothing; a later bad byte in a large text file becomes U+FFFD rather than failing a long
    preparation. A blank file yields nothing.
    """
    if not is_utf8_text(path):
        return
    buffer, blank_pieces, seen_text, consumed = "", [], False, 0
    with reading(path), path.open(encoding="utf-8", errors="replace") as f:
        while True:
            # A block ends at a line break (or 1 MiB further), so `strip` is never cut in two.
            text = f.read(TEXT_BLOCK_BYTES)
            text += f.readline(1 << 20) if text else ""
            position = f.buffer.tell()
            on_bytes(position - consumed)
            consumed = position
            buffer = (buffer + text).replace(strip, "") if strip else buffer + text
            start = 0
            while text or start < len(buffer):  # at the end of the file the rest is one piece
                end = buffer.find("\n", start + doc_chars)
                if end == -1:
                    if text:
                        break
                    end = len(buffer) - 1
                piece = buffer[start:end + 1]
                start = end + 1
                if seen_text:
                    yield piece
                elif piece.strip():  # pieces before the first non-blank one wait: the whole
                    seen_text = True  # file may be blank, and a blank file is skipped
                    yield from blank_pieces
                    blank_pieces = []
                    yield piece
                else:
                    blank_pieces.append(piece)
            buffer = buffer[start:]
            if not text:
                return


def read_text_file(source: SourceFile, doc_chars: int, strip: str, on_bytes: OnBytes
                   ) -> Iterator[Document]:
    for i, piece in enumerate(text_file_pieces(source.path, doc_chars, strip, on_bytes)):
        yield Document(source.document_name(i), piece, split=source.split)


def iter_documents(sources: list[SourceFile], doc_chars: int, strip: str, text_field: str,
                   on_bytes: OnBytes = lambda n: None, vocab_size: int = 0, eot: int = -1
                   ) -> Iterator[Document]:
    """Every document of `sources`, in order; `strip` (the end-of-text marker) removed from text.
    Token files need the tokenizer's `vocab_size` and end-of-text id `eot`."""
    for source in sources:
        if source.kind == "text":
            yield from read_text_file(source, doc_chars, strip, on_bytes)
        elif source.kind == "tokens":
            yield from token_files.read_token_file(source, vocab_size, eot, on_bytes)
        else:
            yield from formats.read_records(source, text_field, strip, on_bytes)


def estimated_text_bytes(sources: list[SourceFile], text_field: str) -> int:
    """About how many bytes of text the sources hold, without reading them (for sampling)."""
    return sum(formats.estimated_text_bytes(s, text_field) for s in sources)


def is_validation(doc_name: str, val_fraction: float) -> bool:
    """Deterministic split by document: a hash of its name, not its position."""
    bucket = int(hashlib.sha1(doc_name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < val_fraction
