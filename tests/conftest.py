import os
from pathlib import Path

import pytest

# Test tensors are tiny: one thread avoids thread-pool hand-offs that cost more than the work
# (and oversubscription when a test starts subprocesses). Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.manual_seed(0)
    yield


@pytest.fixture
def lfw_root() -> Path:
    root = SHARED_DATA / "lfw"
    if not (root / "pairs.txt").is_file():
        pytest.skip(f"real LFW data not found at {root} (only present on the project's dev machines)")
    return root


@pytest.fixture
def orl_root() -> Path:
    root = SHARED_DATA / "orl_faces"
    if not root.is_dir():
        pytest.skip(f"real ORL data not found at {root} (only present on the project's dev machines)")
    return root
