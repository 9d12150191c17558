"""Identity-per-folder trees: `ROOT/<identity>/<image>` (the LFW and ORL layouts included).

Labels are the positions of the identity folder names in sorted order, so the same tree always
gives the same labels. Files are found once at open time; images are decoded lazily.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from shrinkcli.data.base import FaceDataset
from shrinkcli.data.transforms import decode_image
from shrinkcli.errors import BadInputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pbm", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def identity_folders(root: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    except OSError as exc:
        raise BadInputError(f"cannot read image folder {root}: {exc.strerror}",
                            hint="pass a directory with one sub-folder per identity") from exc


def looks_like_identity_tree(root: Path) -> bool:
    """True if some sub-folder of `root` directly holds image files."""
    for name in identity_folders(root)[:50]:
        try:
            if any(is_image_file(entry.name) for entry in os.scandir(root / name) if entry.is_file()):
                return True
        except OSError:
            continue
    return False


class FolderDataset(FaceDataset):
    def __init__(self, root: str | os.PathLike, *, identities: Iterable[str] | None = None,
                 spec: str | None = None, **options):
        self.root = Path(root)
        self.spec = spec or f"folder:{self.root}"
        if not self.root.is_dir():
            raise BadInputError(f"image folder {self.root} does not exist",
                                hint="pass a directory with one sub-folder per identity")
        names = identity_folders(self.root)
        if identities is not None:
            wanted = set(identities)
            missing = sorted(wanted - set(names))
            if missing:
                raise BadInputError(f"{len(missing)} identities not found under {self.root}, e.g. {missing[0]!r}",
                                    hint="check the image root matches the pairs/identity list")
            names = [name for name in names if name in wanted]
        if not names:
            raise BadInputError(f"no identity folders in {self.root}",
                                hint="expected ROOT/<identity>/<image>.jpg (one sub-folder per person)")
        skip = options.get("skip_corrupt", False)
        files: list[str] = []
        labels: list[int] = []
        self.class_names: list[str] = []
        empty = 0
        for name in names:
            folder = self.root / name
            images = sorted(entry.name for entry in os.scandir(folder) if entry.is_file() and is_image_file(entry.name))
            if not images:
                if skip:
                    empty += 1
                    continue
                raise BadInputError(f"identity folder {folder} has no images",
                                    hint="remove it, or pass skip_corrupt to skip empty identities")
            label = len(self.class_names)
            self.class_names.append(name)
            files.extend(f"{name}/{image}" for image in images)
            labels.extend([label] * len(images))
        self.files = files
        super().__init__(np.asarray(labels, dtype=np.int64), num_classes=len(self.class_names), **options)
        self.skipped = empty

    def path(self, index: int) -> Path:
        return self.root / self.files[index]

    def describe(self, index: int) -> str:
        return str(self.path(index))

    def _load(self, index: int) -> np.ndarray:
        return decode_image(self.path(index), input_size=self.input_size, crop=self.crop)

    def encoded(self, index: int) -> bytes:
        return self.path(index).read_bytes()
