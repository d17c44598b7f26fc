"""Shared fixtures: the shared data beside the project, and one token cache per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.fail(f"{SHAKESPEARE} is missing: tests need ../shared beside the project")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/token cache for the whole session, so each corpus is tokenized once."""
    return tmp_path_factory.mktemp("bigbatch-cache")


@pytest.fixture(scope="session")
def tiny_overrides(shakespeare, cache_dir) -> list[str]:
    """Overrides that point configs/tiny.toml at tinyshakespeare and the session cache."""
    return [f"--data.path={shakespeare}", f"--data.cache_dir={cache_dir}"]


@pytest.fixture
def single_thread():
    """One torch thread for tests of tiny models: with 2 threads on a loaded 2-core machine, the
    OpenMP workers wait on each other and a millisecond op takes seconds (measured 0.1 s -> 6 s).
    Restored afterwards, so training runs keep their threads. Use it through
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
