"""Each source format gives the tokens the same texts give as plain text files.

Invariants (with the GPT-2 tokenizer from shared/, so no BPE training is involved):
- a directory of one .txt per text gives exactly `tokenizer.encode(text)` for every text, each
  followed by the end-of-text token, split into training and validation by document;
- JSONL, gzipped JSONL, a directory of Parquet files, a `datasets` save_to_disk Dataset, .npy
  ids, raw nanoGPT .bin ids and llm.c .bin ids (header, end-of-text before each document) give
  the same multiset of documents; where the layout names the validation split (a DatasetDict's
  "validation", nanoGPT's val.bin) those texts are the validation documents, in order;
- each unreadable input is a one-line UsageError naming the file and what was expected.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from bigbatch.config.sections import DataConfig
from bigbatch.data.corpus import prepare_corpus
from bigbatch.data.token_files import LLMC_MAGIC
from bigbatch.data.tokenizer import eot_id, load_tokenizer_dir
from bigbatch.errors import UsageError
from conftest import SHARED

GPT2 = str(SHARED / "models/gpt2-bpe")
NUM_VAL = 6  # texts a layout itself holds out (DatasetDict "validation", val.bin)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    paragraphs = (SHARED / "data/tinyshakespeare/input.txt").read_text().split("\n\n")
    return [p + "\n" for p in paragraphs if len(p) > 200][:60]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer_dir(GPT2)


def documents(tokens: np.ndarray, eot: int) -> list[tuple[int, ...]]:
    """The documents of a cache's token array: the runs that each end with end-of-text."""
    ends = np.flatnonzero(np.asarray(tokens) == eot)
    assert len(ends) and ends[-1] == len(tokens) - 1
    return [tuple(int(i) for i in doc) for doc in np.split(np.asarray(tokens), ends + 1)[:-1]
            for doc in [doc[:-1]]]


def prepared(tmp_path: Path, path: Path, **settings):
    cfg = DataConfig(path=str(path), tokenizer=GPT2, cache_dir=str(tmp_path / "cache"),
                     **settings)
    corpus = prepare_corpus(cfg)
    return (documents(corpus.train_tokens, corpus.eot_id),
            documents(corpus.val_tokens, corpus.eot_id))


def id_stream(tokenizer, texts: list[str], eot_first: bool = False) -> np.ndarray:
    eot = eot_id(tokenizer)
    ids = []
    for text in texts:
        doc = tokenizer.encode(text, add_special_tokens=False).ids
        ids += [eot, *doc] if eot_first else [*doc, eot]
    return np.array(ids, dtype=np.uint16)


def write_text_dir(root: Path, texts, tokenizer) -> Path:
    root.mkdir()
    for i, text in enumerate(texts):
        (root / f"t{i:03d}.txt").write_text(text)
    return root


def write_jsonl(root: Path, texts, tokenizer) -> Path:
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "content": t}) + "\n"
                            for i, t in enumerate(texts)))
    return path


def write_jsonl_gz(root: Path, texts, tokenizer) -> Path:
    path = root / "corpus.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps({"content": t}) + "\n" for t in texts)
    return path


def write_parquet_dir(root: Path, texts, tokenizer) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "pq").mkdir()
    half = len(texts) // 2
    for i, part in enumerate((texts[:half], texts[half:])):
        table = pa.table({"n": list(range(len(part))), "content": part})
        pq.write_table(table, root / "pq" / f"part-{i}.parquet", row_group_size=7)
    (root / "pq" / "README.md").write_text("not a document: the Parquet files are")
    return root / "pq"


def write_hf_dataset(root: Path, texts, tokenizer) -> Path:
    from datasets import Dataset

    Dataset.from_dict({"content": texts, "n": list(range(len(texts)))}).save_to_disk(
        root / "hf", max_shard_size="20KB")
    return root / "hf"


def write_npy(root: Path, texts, tokenizer) -> Path:
    np.save(root / "ids.npy", id_stream(tokenizer, texts))
    return root / "ids.npy"


def write_llmc_bin(root: Path, texts, tokenizer) -> Path:
    ids = id_stream(tokenizer, texts, eot_first=True)
    header = np.zeros(256, dtype=np.int32)
    header[:3] = LLMC_MAGIC, 1, len(ids)
    (root / "shard_000000.bin").write_bytes(header.tobytes() + ids.tobytes())
    return root / "shard_000000.bin"


FORMATS = [write_jsonl, write_jsonl_gz, write_parquet_dir, write_hf_dataset, write_npy,
           write_llmc_bin]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, texts, tokenizer):
    tmp = tmp_path_factory.mktemp("plain")
    train, val = prepared(tmp, write_text_dir(tmp / "txt", texts, tokenizer))
    expected = [tuple(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts]
    assert sorted(train + val) == sorted(expected)  # the oracle: the tokenizer's own encode
    assert val and len(train) > len(val)
    return sorted(train + val)


@pytest.mark.parametrize("write", FORMATS, ids=lambda f: f.__name__[6:])
def test_each_format_gives_the_documents_of_plain_text_files(tmp_path, texts, tokenizer,
                                                              plain, write):
    path = write(tmp_path, texts, tokenizer)
    train, val = prepared(tmp_path, path, text_field="content")
    assert val and train  # split by document
    assert sorted(train + val) == plain


def test_layouts_that_name_their_validation_split_keep_it(tmp_path, texts, tokenizer):
    from datasets import Dataset, DatasetDict

    expected_val = [tuple(tokenizer.encode(t, add_special_tokens=False).ids)
                    for t in texts[-NUM_VAL:]]
    DatasetDict(train=Dataset.from_dict({"content": texts[:-NUM_VAL]}),
                validation=Dataset.from_dict({"content": texts[-NUM_VAL:]}),
                test=Dataset.from_dict({"content": ["never read"] * 3})
                ).save_to_disk(tmp_path / "dict")
    nanogpt = tmp_path / "nanogpt"
    nanogpt.mkdir()
    id_stream(tokenizer, texts[:-NUM_VAL]).tofile(nanogpt / "train.bin")
    id_stream(tokenizer, texts[-NUM_VAL:]).tofile(nanogpt / "val.bin")
    for path in (tmp_path / "dict", nanogpt):
        train, val = prepared(tmp_path / path.name, path, text_field="content")
        assert val == expected_val
        assert len(train) == len(texts) - NUM_VAL


def bad_inputs(root: Path) -> list[tuple[Path, dict, str]]:
    """(data.path, other settings, what the error must say) for each kind of bad input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "bad.jsonl").write_text('{"content": "fine"}\n{"content": oops}\n')
    (root / "nokey.jsonl").write_text('{"body": "text"}\n')
    (root / "number.jsonl").write_text('{"content": 7}\n')
    (root / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08 not gzip at all")
    pq.write_table(pa.table({"body": ["a", "b"]}), root / "nocol.parquet")
    (root / "fake.parquet").write_bytes(b"PAR1 nothing like parquet")
    (root / "odd.bin").write_bytes(b"\x01\x00\x02")
    np.save(root / "big_ids.npy", np.array([1, 2, 60000], dtype=np.uint16))
    np.save(root / "matrix.npy", np.zeros((2, 3), dtype=np.uint16))
    (root / "mixed").mkdir()
    (root / "mixed" / "a.jsonl").write_text('{"content": "x"}\n')
    pq.write_table(pa.table({"content": ["y"]}), root / "mixed" / "b.parquet")
    gpt2 = {"tokenizer": GPT2, "text_field": "content"}
    return [
        (root / "bad.jsonl", gpt2, r"bad\.jsonl:2: not JSON .*expected one JSON object per line"),
        (root / "nokey.jsonl", gpt2, r"nokey\.jsonl:1: no data.text_field = 'content' "
                                     r"\(found \['body'\]\)"),
        (root / "number.jsonl", gpt2, r"number\.jsonl: record 0 .* of type int: expected a "
                                      "string"),
        (root / "bad.jsonl.gz", gpt2, r"bad\.jsonl\.gz: unreadable .*gzip-compressed"),
        (root / "nocol.parquet", gpt2, r"nocol\.parquet: no column data.text_field = 'content'"),
        (root / "fake.parquet", gpt2, r"fake\.parquet: not a Parquet file"),
        (root / "odd.bin", gpt2, r"odd\.bin: 3 bytes is not a whole number of uint16"),
        (root / "big_ids.npy", gpt2, r"big_ids\.npy: token id 60000 is outside"),
        (root / "matrix.npy", gpt2, r"matrix\.npy: a \.npy of shape \(2, 3\).*expected a 1-D"),
        (root / "big_ids.npy", {}, r"holds token ids \(big_ids\.npy\): set data.tokenizer"),
        (root / "mixed", gpt2, r"mixes jsonl and parquet files: narrow data.pattern"),
    ]


def test_each_unreadable_input_is_a_one_line_error_naming_the_file(tmp_path):
    for path, settings, message in bad_inputs(tmp_path):
        cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **settings)
        with pytest.raises(UsageError, match=message) as err:
            prepare_corpus(cfg)
        assert "\n" not in str(err.value), str(err.value)


def test_token_files_named_for_validation_are_the_validation_split():
    from bigbatch.data.sources import names_validation

    for name in ("val.bin", "fineweb_val_000000.bin", "validation.npy", "shard-valid-1.bin"):
        assert names_validation(Path(name)), name
    for name in ("train.bin", "interval.bin", "fineweb_train_000001.bin", "evaluate.npy"):
        assert not names_validation(Path(name)), name
