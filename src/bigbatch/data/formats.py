"""Records with a text field: JSONL (optionally gzipped), Parquet, and `datasets` Arrow files.

Each is read a bounded batch of rows at a time. Parquet and Arrow go through pyarrow; the Arrow
files of a `save_to_disk` directory are read as IPC streams from an ordinary file rather than
memory-mapped (as `datasets.load_from_disk` does), because every mapped page read stays in the
process's resident set and the preparation's peak memory would grow with the corpus.
Each unreadable input is a one-line UsageError naming the file and what was expected.
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from bigbatch.data.documents import Document, OnBytes, SourceFile, one_line, reading
from bigbatch.errors import UsageError

ROWS_PER_BATCH = 1024


def _record(source: SourceFile, index: int, value, field: str, strip: str) -> Document | None:
    """The document of one record, or None for a blank one (as a blank text file is skipped)."""
    if not isinstance(value, str):
        raise UsageError(f"{source.path}: record {index} has data.text_field = {field!r} of type "
                         f"{type(value).__name__}: expected a string")
    text = value.replace(strip, "")
    if not text.strip():
        return None
    return Document(source.document_name(index), text, split=source.split)


def read_jsonl(source: SourceFile, field: str, strip: str, on_bytes: OnBytes
               ) -> Iterator[Document]:
    with reading(source.path):
        raw = source.path.open("rb")
    with raw:
        lines = gzip.GzipFile(fileobj=raw) if source.path.name.endswith(".gz") else raw
        consumed = 0
        try:
            for number, line in enumerate(lines, start=1):
                if number % ROWS_PER_BATCH == 0:
                    on_bytes(raw.tell() - consumed)
                    consumed = raw.tell()
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise UsageError(f"{source.path}:{number}: not JSON ({err}): expected one "
                                     "JSON object per line") from None
                if not isinstance(row, dict) or field not in row:
                    keys = sorted(row)[:8] if isinstance(row, dict) else type(row).__name__
                    raise UsageError(f"{source.path}:{number}: no data.text_field = {field!r} "
                                     f"(found {keys}): set data.text_field to the key of the text")
                doc = _record(source, number - 1, row[field], field, strip)
                if doc is not None:
                    yield doc
        except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
            raise UsageError(f"{source.path}: unreadable ({err}): expected UTF-8 JSON lines"
                             f"{', gzip-compressed' if lines is not raw else ''}") from None
        on_bytes(raw.tell() - consumed)


def _column_batches(source: SourceFile, field: str):
    """(column names, iterator of pyarrow arrays of the text column) of a Parquet/Arrow file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = "a Parquet file" if source.kind == "parquet" else "a datasets Arrow (IPC) file"
    with reading(source.path):  # pyarrow's own error would hide why it could not open it
        source.path.open("rb").close()
    try:
        if source.kind == "parquet":
            reader = pq.ParquetFile(source.path)
            names = reader.schema_arrow.names
            batches = (b.column(0) for b in reader.iter_batches(ROWS_PER_BATCH, columns=[field])
                       ) if field in names else iter(())
        else:
            reader = pa.ipc.open_stream(pa.OSFile(str(source.path)))
            names = reader.schema.names
            index = names.index(field) if field in names else 0
            batches = (b.column(index) for b in reader)
    except (pa.ArrowException, OSError) as err:
        raise UsageError(f"{source.path}: not {expected} ({one_line(err)})") from None
    if field not in names:
        raise UsageError(f"{source.path}: no column data.text_field = {field!r} (columns: "
                         f"{names[:8]}): set data.text_field to the text column")
    return batches, expected


def read_columnar(source: SourceFile, field: str, strip: str, on_bytes: OnBytes
                  ) -> Iterator[Document]:
    import pyarrow as pa

    batches, expected = _column_batches(source, field)
    size, index = source.path.stat().st_size, 0
    try:
        for column in batches:
            if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
                raise UsageError(f"{source.path}: column data.text_field = {field!r} is "
                                 f"{column.type}: expected strings")
            on_bytes(min(column.nbytes, size))
            size -= min(column.nbytes, size)
            for value in column.to_pylist():
                doc = None if value is None else _record(source, index, value, field, strip)
                index += 1
                if doc is not None:
                    yield doc
    except (pa.ArrowException, OSError) as err:
        raise UsageError(f"{source.path}: not {expected} ({one_line(err)})") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{source.path}: column data.text_field = {field!r} holds text that "
                         f"is not UTF-8 ({err.reason} at byte {err.start}): expected UTF-8 "
                         "strings") from None
    on_bytes(size)


def read_records(source: SourceFile, field: str, strip: str, on_bytes: OnBytes
                 ) -> Iterator[Document]:
    if source.kind == "jsonl":
        return read_jsonl(source, field, strip, on_bytes)
    return read_columnar(source, field, strip, on_bytes)


def _gzip_size(path: Path) -> int:
    """The uncompressed size a gzip file's trailer records (modulo 4 GiB, as gzip keeps it)."""
    size = path.stat().st_size
    with reading(path), path.open("rb") as f:
        f.seek(max(size - 4, 0))
        stored = struct.unpack("<I", f.read(4).rjust(4, b"\0"))[0]
    return stored if stored >= size else 4 * size  # wrapped past 4 GiB: guess a 4x ratio


def estimated_text_bytes(source: SourceFile, field: str) -> int:
    if source.path.name.endswith(".gz"):
        return _gzip_size(source.path)
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(source.path).metadata
            columns = [meta.schema.column(i).path for i in range(meta.num_columns)]
            if field in columns:
                column = columns.index(field)
                return sum(meta.row_group(g).column(column).total_uncompressed_size
                           for g in range(meta.num_row_groups))
        except Exception:  # unreadable: read_columnar says so with the file's name
            pass
    return source.path.stat().st_size
