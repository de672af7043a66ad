from pathlib import Path

import pytest
import torch

from erasekit.testing import save_tiny_pipeline, tiny_pipeline

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def repository_root_stays_clean():
    """No test may write into the repository's root (a CLI run resolving an output against the
    working directory once committed its images and index there)."""
    before = {p.name for p in REPO.iterdir()}
    yield
    new = sorted({p.name for p in REPO.iterdir()} - before - {".pytest_cache", ".ruff_cache"})
    assert not new, f"tests wrote into the repository root: {new}"


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models and float64 solves are dominated by thread
    synchronisation, and on a busy 2-core machine two threads run several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_pipe():
    """A random-weight tiny SD pipeline (fresh per test, so tests may modify it)."""
    return tiny_pipeline(0)


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """A tiny SD pipeline saved as a diffusers folder."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd")
