"""`open_dataset(spec)`: one entry point for every training-data format.

Specs: `folder:PATH`, `rec:PATH/train.rec` (or its folder), `hf:PATH_OR_NAME[?image=col&label=col]`,
`lfw-half:ROOT`, `lfw-half-train:ROOT` (lfw-half without the `lfw-half-val` identities),
`synthetic[:IDS[:PER_ID[:SEED]]]`, or a bare path, detected as: a folder holding
train.rec or a .rec file -> rec; a folder with dataset_info.json / state.json / dataset_dict.json
-> hf (save_to_disk); a folder of parquet files -> hf; a folder of identity folders -> folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from shrinkcli.errors import BadInputError

SPEC_HELP = ("use folder:PATH, rec:PATH/train.rec, hf:PATH_OR_NAME, lfw-half:ROOT, lfw-half-train:ROOT, "
             "synthetic[:IDS[:PER_ID[:SEED]]], or a path to one of those")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def detect_kind(path: Path) -> str:
    """The reader for a bare path, or BadInputError saying what was looked for."""
    if path.is_file():
        if path.suffix == ".rec":
            return "rec"
        if path.suffix in (".parquet", ".arrow"):
            return "hf"
        raise BadInputError(f"cannot tell the data format of file {path}",
                            hint="a file must be a .rec (with .idx beside it) or .parquet; " + SPEC_HELP)
    if not path.is_dir():
        raise BadInputError(f"data path {path} does not exist", hint=SPEC_HELP)
    if (path / "train.rec").is_file():
        return "rec"
    if any((path / marker).is_file() for marker in HF_MARKERS):
        return "hf"
    if any(path.glob("*.parquet")) or any(path.glob("*/*.parquet")):
        return "hf"
    from shrinkcli.data.folder import looks_like_identity_tree

    if looks_like_identity_tree(path):
        return "folder"
    if (path / "pairs.txt").is_file() and (path / "images").is_dir():
        return "folder-images"
    raise BadInputError(f"no dataset recognised at {path}",
                        hint="expected train.rec, a saved HF dataset, or one sub-folder of images per identity")


def open_dataset(spec, *, input_size: int = 112, crop: int | None = None, mean: float = 127.5,
                 std: float = 127.5, skip_corrupt: bool = False):
    """Open a labelled face dataset; `ds[i] -> (float32 [3,H,W] normalised, label, index)`."""
    options = dict(input_size=input_size, crop=crop, mean=mean, std=std, skip_corrupt=skip_corrupt)
    spec = str(spec)
    if not spec:
        raise BadInputError("empty data spec", hint=SPEC_HELP)
    kind, sep, rest = spec.partition(":")
    if spec == "synthetic" or kind == "synthetic":
        from shrinkcli.data.synthetic import SyntheticDataset, parse_synthetic_spec

        identities, per_identity, seed = parse_synthetic_spec(spec)
        return SyntheticDataset(identities, per_identity, seed, spec=spec, **options)
    if sep and kind == "folder":
        from shrinkcli.data.folder import FolderDataset

        return FolderDataset(rest, spec=spec, **options)
    if sep and kind == "lfw-half":
        from shrinkcli.data.folder import FolderDataset
        from shrinkcli.data.splits import lfw_half_train_identities, lfw_image_dir

        return FolderDataset(lfw_image_dir(rest), identities=lfw_half_train_identities(rest), spec=spec, **options)
    if sep and kind == "lfw-half-train":
        from shrinkcli.data.folder import FolderDataset
        from shrinkcli.data.splits import lfw_half_validation_split, lfw_image_dir

        return FolderDataset(lfw_image_dir(rest), identities=lfw_half_validation_split(rest)[1], spec=spec, **options)
    if sep and kind == "rec":
        from shrinkcli.data.recordio import RecordDataset

        return RecordDataset(rest, spec=spec, **options)
    if sep and kind == "hf":
        from shrinkcli.data.hf import HFDataset

        return HFDataset(rest, spec=spec, **options)
    if sep and len(kind) > 1 and not os.path.exists(spec):
        raise BadInputError(f"unknown data spec kind {kind!r} in {spec!r}", hint=SPEC_HELP)
    path = Path(spec)
    detected = detect_kind(path)
    if detected == "folder-images":
        return open_dataset(f"folder:{path / 'images'}", **options)
    return open_dataset(f"{detected}:{path}", **options)
