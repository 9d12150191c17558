"""Training images without identity labels, for `shrink distill --no-labels`.

Learning from the teacher alone needs no identities, so any directory of face images will do: every
image file below it (any depth, sorted by path) is one sample, all with label 0. Labelled specs
(folder:, rec:, hf:, lfw-half:, synthetic) still go through `shrinkcli.data.open_dataset`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from shrinkcli.data.base import FaceDataset
from shrinkcli.data.folder import is_image_file
from shrinkcli.data.transforms import decode_image
from shrinkcli.errors import BadInputError


def image_files(root: Path) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.relpath(os.path.join(folder, f), root) for f in files if is_image_file(f))
    return sorted(found)


class UnlabelledImages(FaceDataset):
    """Every image under `root`; `ds[i] -> (image, 0, i)`."""

    def __init__(self, root: str | os.PathLike, *, spec: str | None = None, **options):
        self.root = Path(root)
        self.spec = spec or str(self.root)
        self.files = image_files(self.root) if self.root.is_dir() else []
        if not self.files:
            raise BadInputError(f"no image files under {self.root}",
                                hint="pass a directory of .jpg/.png face images, or a data spec (see docs/data.md)")
        super().__init__(np.zeros(len(self.files), dtype=np.int64), num_classes=1, **options)

    def describe(self, index: int) -> str:
        return str(self.root / self.files[index])

    def _load(self, index: int) -> np.ndarray:
        return decode_image(self.root / self.files[index], input_size=self.input_size, crop=self.crop)


def unlabelled_root(spec: str) -> Path | None:
    """The directory a `--no-labels` spec names (`folder:PATH` or a bare path), if it is one."""
    kind, sep, rest = str(spec).partition(":")
    path = Path(rest) if sep and kind == "folder" else Path(spec)
    return path if path.is_dir() else None
