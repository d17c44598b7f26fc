"""Shared fixtures: the shared data beside the project, and one token cache per test session;
the slow mark for every test under tests/integration/ (tests/README.md says where tests go)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before any test module imports torch (OpenMP reads this once): idle OpenMP workers sleep
# instead of spinning. On this shared 2-core machine under load, spinning workers steal each
# other's core: tiny.toml trained at 1-3.6K tok/s by default and 8-16K tok/s with PASSIVE
# (alternating 8-step runs), and the end-to-end test's training took 17 minutes instead of ~2.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config, items):
    """Every test under tests/integration/ is slow (`make test-fast` leaves them out), without a
    mark in each file. `@pytest.mark.cuda` tests run where torch sees a GPU and skip, saying why,
    elsewhere."""
    for item in items:
        if item.path.is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.slow)
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    why = ("this torch is built without CUDA" if torch.version.cuda is None
           else f"no CUDA device visible (torch {torch.__version__}, CUDA {torch.version.cuda})")
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {why}")
    for item in marked:
        item.add_marker(skip)
