"""The paper's large benchmarks run on an artifact: IJB-B/C 1:1 templates and MegaFace rank-1.

Both embed images in bounded chunks, so memory does not grow with the benchmark's size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from shrinkcli.errors import BadInputError

IMAGE_DIRS = ("images", "loose_crop", "aligned")


def ijb_image_dir(root: Path) -> Path:
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    raise BadInputError(f"IJB: no image folder ({', '.join(IMAGE_DIRS)}) under {root}",
                        hint="put the release's loose_crop folder (aligned with its 5-point landmarks) or "
                             "aligned crops in ROOT/images")


def ijb_landmarks(root: Path, image_dir: Path, names: list[str]) -> dict[str, np.ndarray] | None:
    """The release's 5-point landmarks when the images are its loose crops; None for aligned crops."""
    from shrinkcli.evaluate.align import read_landmarks

    if image_dir.name != "loose_crop":
        return None
    found = [p for folder in (root / "meta", root) if folder.is_dir() for p in sorted(folder.glob("*_name_5pts_score.txt"))]
    if not found:
        raise BadInputError(f"IJB: {image_dir} holds loose crops but no *_name_5pts_score.txt was found under {root}",
                            hint="add the release's landmark file to ROOT/meta, or put aligned crops in ROOT/images")
    landmarks = read_landmarks(found[0])
    missing = [n for n in names if n not in landmarks]
    if missing:
        raise BadInputError(f"IJB: {len(missing)} face images have no landmarks in {found[0]} (first: {missing[0]})")
    return landmarks


def _ijb_pixels(image_dir: Path, name: str, *, input_size: int, crop: int | None,
                landmarks: dict[str, np.ndarray] | None) -> np.ndarray:
    from shrinkcli.data.transforms import decode_image

    if landmarks is None:
        return decode_image(image_dir / name, input_size=input_size, crop=crop)
    from PIL import Image

    from shrinkcli.evaluate.align import align_face

    try:
        with Image.open(image_dir / name) as image:
            aligned = align_face(image, landmarks[name], size=input_size)
    except OSError as exc:
        raise BadInputError(f"IJB: cannot read {image_dir / name} ({exc})") from exc
    return np.ascontiguousarray(np.asarray(aligned, dtype=np.uint8).transpose(2, 0, 1))


def _ijb_features(runner: Any, names: list[str], image_dir: Path, *, crop: int | None, batch_size: int,
                  flip: bool, landmarks: dict[str, np.ndarray] | None = None, chunk: int = 1024) -> Iterator[np.ndarray]:
    for start in range(0, len(names), chunk):
        pixels = np.stack([_ijb_pixels(image_dir, name, input_size=runner.input_size, crop=crop, landmarks=landmarks)
                           for name in names[start:start + chunk]])
        yield runner.embed(pixels, batch_size=batch_size, flip=flip)


def run_ijb(runner: Any, root: str, *, crop: int | None, batch_size: int = 64, flip: bool = True) -> dict[str, Any]:
    """TAR at FAR 1e-6..1e-1 from `root`'s meta files and face images (one row per face-file line).

    Loose crops (`loose_crop/`) are aligned with the release's 5-point landmarks to the model's
    input size; crops in `images/` or `aligned/` are taken as already aligned.
    """
    from shrinkcli.evaluate.ijb import evaluate_ijb, load_ijb_meta

    root_path = Path(root)
    meta = load_ijb_meta(root_path)
    image_dir = ijb_image_dir(root_path)
    landmarks = ijb_landmarks(root_path, image_dir, meta.image_names)
    features = np.concatenate(list(_ijb_features(runner, meta.image_names, image_dir, crop=crop,
                                                 batch_size=batch_size, flip=flip, landmarks=landmarks)))
    return {"root": str(root_path), "images": len(meta.image_names), "aligned_from_landmarks": landmarks is not None,
            **evaluate_ijb(features, meta)}


def run_megaface(runner: Any, probes: str, distractors: str, *, crop: int | None, batch_size: int = 64,
                 flip: bool = True, role: str = "model") -> dict[str, Any]:
    """MegaFace challenge-1 rank-1: each (probe, genuine) trial against every distractor, streamed.

    `probes` and `distractors` are labelled image sets or feature stores of this runner's model.
    """
    from shrinkcli.evaluate.megaface import megaface_rank1
    from shrinkcli.evaluate.sources import distractor_rows, labelled_embeddings

    options = dict(crop=crop, batch_size=batch_size, flip=flip, role=role)
    probe_emb, labels = labelled_embeddings(probes, runner, **options)
    rows = distractor_rows(distractors, runner, probes=len(probe_emb), **options)
    return {"probes": probes, "distractor_set": distractors, **megaface_rank1(probe_emb, labels, rows)}
