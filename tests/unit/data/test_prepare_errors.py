"""Bad data is one line naming the file, whichever process of the preparation reads it.

Invariants:
- a source file or directory that cannot be read (no read permission), at the top of data.path
  or inside a directory, or a data.tokenizer that cannot be loaded, is a UsageError of one line naming that file and how to fix it; so are a `datasets`
  save_to_disk directory missing an Arrow file its state.json lists, a DatasetDict whose
  dataset_dict.json is broken or not UTF-8, and token ids below zero or at/above the vocabulary
  (naming the bad id and the valid range);
- the preparation's child process (corpus.prepare_corpus_in_child, what `bigbatch train` uses)
  carries that line back to the parent as the same UsageError, and under --debug also prints
  its traceback; `bigbatch train` prints the one line and exits 2, with no traceback;
- a bug in the child (any other exception) is still its traceback and a non-zero failure.

Root reads every file whatever its mode, so where the tests run as root the unreadable-file
cases run in a forked child that first drops to the unprivileged user `nobody` (a broken symlink,
a FIFO or a directory in a file's place would not do: the directory listing leaves them out and
no open is ever tried, so the code path of a file refusing to open would go untested).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bigbatch.config.sections import DataConfig
from bigbatch.data.corpus import USAGE_ERROR, prepare_corpus, prepare_corpus_in_child
from bigbatch.errors import UsageError
from conftest import SHARED
from small_runs import ROOT, cli_command, small_args

GPT2 = str(SHARED / "models/gpt2-bpe")
VOCAB = 50257  # GPT-2's, with the end-of-text token
NOBODY = 65534  # the unprivileged user's uid and gid
NEGATIVE_IDS = np.array([464, 3290, 50256, 318, -3, 50256], dtype=np.int32)


def settings(path: Path, cache: Path) -> DataConfig:
    return DataConfig(path=str(path), tokenizer=GPT2, text_field="content",
                      cache_dir=str(cache / "cache"))


def raised(prepare: Callable[[], object]) -> str:
    """'Type: message' of what `prepare()` raises, or 'no error'."""
    try:
        prepare()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def raised_without_privileges(prepare: Callable[[], object], unreadable: Path) -> str:
    """`raised(prepare)` where file permissions hold: in this process when it is not root, else
    in a forked child that drops to `nobody` first (and reports back through a pipe)."""
    def attempt() -> str:
        try:
            os.listdir(unreadable) if unreadable.is_dir() else unreadable.open("rb").close()
        except PermissionError:
            return raised(prepare)
        return "SKIP"

    if os.geteuid() != 0:
        outcome = attempt()
    else:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                outcome = attempt()
            except BaseException as err:  # noqa: BLE001 - reported to the parent instead
                outcome = f"the unprivileged child failed: {err!r}"
            finally:
                os.write(write_end, outcome.encode())
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            outcome = pipe.read().decode()
        os.waitpid(pid, 0)
    if outcome == "SKIP":
        pytest.skip(f"file permissions are not enforced here: {unreadable} (mode 000) opened")
    return outcome


@pytest.fixture
def open_dir():
    """A directory `nobody` may enter and write in (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="bigbatch-errors-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_texts(directory: Path) -> Path:
    directory.mkdir()
    paragraphs = (SHARED / "data/tinyshakespeare/input.txt").read_text().split("\n\n")[:6]
    for i, text in enumerate(paragraphs):
        (directory / f"part{i}.txt").write_text(text)
    return directory


def unreadable_top_text(root: Path) -> tuple[Path, Path]:
    path = write_texts(root / "texts") / "part0.txt"
    return path, path


def unreadable_top_directory(root: Path) -> tuple[Path, Path]:
    directory = write_texts(root / "texts")
    return directory, directory


def unreadable_text_in_directory(root: Path) -> tuple[Path, Path]:
    directory = write_texts(root / "texts")
    return directory, directory / "part3.txt"


def unreadable_jsonl_gz(root: Path) -> tuple[Path, Path]:
    path = root / "corpus.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps({"content": f"line {i}"}) + "\n" for i in range(4))
    return path, path


def unreadable_parquet(root: Path) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["one", "two", "three"]}), root / "corpus.parquet")
    return root / "corpus.parquet", root / "corpus.parquet"


def unreadable_npy(root: Path) -> tuple[Path, Path]:
    np.save(root / "ids.npy", np.abs(NEGATIVE_IDS).astype(np.uint16))
    return root / "ids.npy", root / "ids.npy"


UNREADABLE = [unreadable_top_text, unreadable_top_directory, unreadable_text_in_directory, unreadable_jsonl_gz,
              unreadable_parquet, unreadable_npy]


@pytest.mark.parametrize("layout", UNREADABLE, ids=lambda f: f.__name__[11:])
def test_an_unreadable_file_is_one_line_naming_it(open_dir, layout):
    data_path, unreadable = layout(open_dir)
    unreadable.chmod(0)
    outcome = raised_without_privileges(
        lambda: prepare_corpus(settings(data_path, open_dir)), unreadable)
    assert outcome == (f"UsageError: {unreadable}: cannot be read (permission denied): make it "
                       "readable by the user running bigbatch (chmod a+r, a+rx for a "
                       "directory), or leave it out with data.path / data.pattern")


@pytest.mark.parametrize("broken", ["unreadable merges.txt", "tokenizer.json cut short"])
def test_an_unreadable_or_broken_tokenizer_is_one_line_naming_it(open_dir, broken):
    tokenizer = open_dir / "tokenizer"
    shutil.copytree(GPT2, tokenizer)
    tokenizer.chmod(0o755)
    cfg = dataclasses.replace(settings(write_texts(open_dir / "texts"), open_dir),
                              tokenizer=str(tokenizer))
    if broken == "unreadable merges.txt":
        (tokenizer / "merges.txt").chmod(0)
        outcome = raised_without_privileges(lambda: prepare_corpus(cfg), tokenizer / "merges.txt")
    else:
        (tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": {')
        outcome = raised(lambda: prepare_corpus(cfg))
    assert outcome.startswith(f"UsageError: data.tokenizer = {str(tokenizer)!r}: its files "
                              "cannot be loaded (")
    assert outcome.endswith("expected readable tokenizer.json, or vocab.json and merges.txt, as "
                            "Hugging Face tokenizers writes them") and "\n" not in outcome


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """save_to_disk output, broken three ways: an Arrow file gone, dataset_dict.json cut short,
    and dataset_dict.json in Latin-1 rather than UTF-8."""
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("hf")
    texts = [f"document {i}\n" for i in range(20)]
    Dataset.from_dict({"content": texts}).save_to_disk(root / "no_arrow")
    arrow = sorted((root / "no_arrow").glob("*.arrow"))[0]
    arrow.unlink()
    DatasetDict(train=Dataset.from_dict({"content": texts})).save_to_disk(root / "cut_dict")
    shutil.copytree(root / "cut_dict", root / "latin1_dict")
    (root / "cut_dict" / "dataset_dict.json").write_text('{"splits": ["train"')
    (root / "latin1_dict" / "dataset_dict.json").write_bytes(
        '{"splits": ["train"], "note": "café"}'.encode("latin-1"))
    return {"no_arrow": root / "no_arrow", "arrow": arrow, "cut_dict": root / "cut_dict",
            "latin1_dict": root / "latin1_dict"}


def test_a_datasets_dir_missing_an_arrow_file_names_it(tmp_path, hf_dirs):
    with pytest.raises(UsageError) as err:
        prepare_corpus(settings(hf_dirs["no_arrow"], tmp_path))
    assert str(err.value) == (
        f"{hf_dirs['arrow']}: missing, though {hf_dirs['no_arrow'] / 'state.json'} lists it: a "
        "datasets save_to_disk directory needs every Arrow file it lists; save the dataset "
        "again or restore the file")


@pytest.mark.parametrize("name, reason", [("cut_dict", "Expecting ',' delimiter"),
                                          ("latin1_dict", "codec can't decode")])
def test_a_broken_dataset_dict_json_is_one_line_naming_it(tmp_path, hf_dirs, name, reason):
    with pytest.raises(UsageError) as err:
        prepare_corpus(settings(hf_dirs[name], tmp_path))
    message = str(err.value)
    assert message.startswith(f"{hf_dirs[name] / 'dataset_dict.json'}: not a datasets "
                              "DatasetDict file (")
    assert reason in message and "\n" not in message
    assert message.endswith('expected {"splits": ["train", ...]} as save_to_disk writes it')


@pytest.mark.parametrize("ids, bad, position", [
    (NEGATIVE_IDS, -3, 4),
    (np.array([464, 50256, 318, VOCAB, 50256], dtype=np.uint16), VOCAB, 3),
], ids=["below zero", "the vocabulary's size"])
def test_token_ids_outside_the_vocabulary_name_the_file_the_id_and_the_range(
        tmp_path, ids, bad, position):
    np.save(tmp_path / "ids.npy", ids)
    with pytest.raises(UsageError) as err:
        prepare_corpus(settings(tmp_path / "ids.npy", tmp_path))
    assert str(err.value) == (
        f"{tmp_path / 'ids.npy'}: token id {bad} is outside data.tokenizer's vocabulary of "
        f"{VOCAB} (valid ids are 0 to {VOCAB - 1}), at position {position}: is it the "
        "tokenizer that made these ids?")


def test_the_child_process_carries_the_line_back(tmp_path):
    """The error raised in the child is the parent's UsageError, word for word."""
    np.save(tmp_path / "ids.npy", NEGATIVE_IDS)
    cfg = settings(tmp_path / "ids.npy", tmp_path)
    with pytest.raises(UsageError) as in_child:
        prepare_corpus_in_child(cfg)
    with pytest.raises(UsageError) as here:
        prepare_corpus(cfg)
    assert str(in_child.value) == str(here.value)


def test_under_debug_the_child_prints_its_traceback_too(tmp_path):
    np.save(tmp_path / "ids.npy", NEGATIVE_IDS)
    cfg = settings(tmp_path / "ids.npy", tmp_path)
    done = subprocess.run([sys.executable, "-m", "bigbatch.data.corpus",
                           json.dumps(dataclasses.asdict(cfg)), str(tmp_path / "cache" / "k")],
                          capture_output=True, text=True, env={**os.environ, "BIGBATCH_DEBUG": "1"})
    assert done.returncode == 2
    assert done.stdout.splitlines()[-1].startswith(USAGE_ERROR)
    assert "Traceback" in done.stderr and "token id -3 is outside" in done.stderr


def test_a_bug_in_the_child_is_its_traceback_and_a_runtime_error(tmp_path, capfd):
    """Not bad data: the child's own exception (here it is handed a setting it does not know)
    keeps its traceback on stderr, and the parent fails with exit 1, not a usage line. A guard:
    this held before the child carried every data error back, and must still hold."""
    @dataclasses.dataclass(frozen=True)
    class UnknownToTheChild(DataConfig):
        surprise: int = 1

    cfg = UnknownToTheChild(path=str(write_texts(tmp_path / "texts")), tokenizer=GPT2,
                            cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="failed in its child process .exit 1; its "
                                           "traceback is above"):
        prepare_corpus_in_child(cfg)
    stderr = capfd.readouterr().err
    assert "Traceback" in stderr and "unexpected keyword argument 'surprise'" in stderr


def train_fails(tmp_path: Path, data_path: Path) -> str:
    """`bigbatch train` on `data_path`: exit 2 and no traceback; its last line on stderr."""
    args = small_args([f"--data.path={data_path}", f"--data.tokenizer={GPT2}",
                       "--data.text_field=content", f"--data.cache_dir={tmp_path / 'cache'}"])
    done = subprocess.run(cli_command("train", *args, "--out", str(tmp_path / "out")),
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # two `bigbatch train` processes, each importing torch
def test_bigbatch_train_says_one_line_and_exits_2(tmp_path, hf_dirs):
    np.save(tmp_path / "ids.npy", NEGATIVE_IDS)
    assert train_fails(tmp_path, tmp_path / "ids.npy").startswith(
        f"bigbatch: error: {tmp_path / 'ids.npy'}: token id -3 is outside")
    assert train_fails(tmp_path, hf_dirs["no_arrow"]).startswith(
        f"bigbatch: error: {hf_dirs['arrow']}: missing")
