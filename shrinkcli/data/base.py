"""The dataset contract every reader fulfils: `ds[i] -> (float image [3,H,W], label, index)`.

Readers implement `_load(i) -> uint8 [3,H,W]` and `describe(i)`; this base adds normalisation,
corrupt-image handling and keeps file handles out of pickles so DataLoader workers open their own.
"""

from __future__ import annotations

import numpy as np

from shrinkcli import log
from shrinkcli.errors import BadInputError


class FaceDataset:
    """Base class (duck-types `torch.utils.data.Dataset`; no torch import at module load)."""

    spec: str = ""

    def __init__(self, labels, *, input_size: int = 112, crop: int | None = None, mean: float = 127.5,
                 std: float = 127.5, skip_corrupt: bool = False, num_classes: int | None = None):
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) == 0:
            raise BadInputError(f"dataset {self.spec or type(self).__name__} has no images",
                                hint="check the path and that identity folders contain images")
        self.num_classes = int(num_classes if num_classes is not None else self.labels.max() + 1)
        if self.labels.min() < 0 or self.labels.max() >= self.num_classes:
            raise BadInputError(f"dataset {self.spec}: labels must lie in [0, {self.num_classes}), "
                                f"found {self.labels.min()}..{self.labels.max()}",
                                hint="fix the labels or the num_classes in the `property` file")
        self.input_size = input_size
        self.crop = crop
        self.mean = mean
        self.std = std
        self.skip_corrupt = skip_corrupt
        self.skipped = 0

    # --- reader hooks -------------------------------------------------------------------------
    def _load(self, index: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"{self.spec}[{index}]"

    # --- public ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    def load_uint8(self, index: int) -> np.ndarray:
        """The preprocessed but not normalised image (uint8 [3,H,W], RGB)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._load(int(index))

    def _image(self, index: int) -> np.ndarray:
        try:
            return self.load_uint8(index)
        except BadInputError as exc:
            if not self.skip_corrupt:
                raise
            return self._substitute(index, exc)

    def item_uint8(self, index: int):
        """`(uint8 image [3,H,W], label, index)`: what the training loader ships; the trainer
        applies `(x - mean) / std` in float32 on the device (the same numbers as `__getitem__`)."""
        import torch

        index = int(index)
        return torch.from_numpy(np.ascontiguousarray(self._image(index))), int(self.labels[index]), index

    def __getitem__(self, index: int):
        import torch

        index = int(index)
        image = self._image(index)
        # numpy, not torch, for this per-image arithmetic: torch's intra-op thread pool costs more
        # than the work on a tiny tensor (measured 25 vs 560 images/s on a busy 2-core machine)
        scaled = (image.astype(np.float32) - np.float32(self.mean)) / np.float32(self.std)
        return torch.from_numpy(scaled), int(self.labels[index]), index

    def _substitute(self, index: int, exc: BadInputError) -> np.ndarray:
        """A corrupt image found mid-training: use the next readable image of the same identity
        (or any), so one bad file does not stop a long run; the count is in `skipped`."""
        self.skipped += 1
        log.warning(f"skipping corrupt image: {exc.message}")
        same = np.flatnonzero(self.labels == self.labels[index])
        candidates = list(same[same != index]) + [i for i in range(len(self)) if i != index][:64]
        for other in candidates:
            try:
                return self._load(int(other))
            except BadInputError:
                continue
        raise exc

    def identity_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def __getstate__(self):
        # open handles (RecordIO files, HF tables) never travel into DataLoader workers
        state = self.__dict__.copy()
        for key in getattr(self, "_unpicklable", ()):
            state[key] = None
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, images={len(self)}, identities={self.num_classes})"


class Uint8View:
    """A dataset's `item_uint8` items as a map-style dataset (picklable into DataLoader workers)."""

    def __init__(self, dataset: FaceDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset.item_uint8(index)
