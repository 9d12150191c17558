import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
