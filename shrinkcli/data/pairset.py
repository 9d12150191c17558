"""The in-memory form of verification pairs (`PairSet`) and the threaded image decoding that fills it.
Every pairs reader (`data.pairs`, `data.binpack`) builds on this module."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from shrinkcli.errors import BadInputError


@dataclass
class PairSet:
    images: "object"            # torch.uint8 [M, 3, H, W], RGB, already cropped and resized
    left: np.ndarray            # int64 [P] indices into images
    right: np.ndarray           # int64 [P]
    issame: np.ndarray          # bool [P]
    folds: np.ndarray | None = None  # int64 [P] fold of each pair, or None (sequential k-fold)
    names: list[str] | None = None   # per image, where known
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.issame)

    def __post_init__(self):
        self.left = np.asarray(self.left, dtype=np.int64)
        self.right = np.asarray(self.right, dtype=np.int64)
        self.issame = np.asarray(self.issame, dtype=bool)
        if self.folds is not None:
            self.folds = np.asarray(self.folds, dtype=np.int64)


def decode_many(loaders: Sequence[Callable[[], np.ndarray]], workers: int | None = None):
    """Run uint8 image loaders in a thread pool (PIL releases the GIL while decoding) -> torch uint8."""
    import torch

    if not loaders:
        raise BadInputError("no images to load for the pairs")
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda load: load(), loaders))
    return torch.from_numpy(np.stack(arrays))
