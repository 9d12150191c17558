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
                        hint="put the face crops (aligned to the model's input) in ROOT/images")


def _ijb_features(runner: Any, names: list[str], image_dir: Path, *, crop: int | None, batch_size: int,
                  flip: bool, chunk: int = 1024) -> Iterator[np.ndarray]:
    from shrinkcli.data.transforms import decode_image

    for start in range(0, len(names), chunk):
        pixels = np.stack([decode_image(image_dir / name, input_size=runner.input_size, crop=crop)
                           for name in names[start:start + chunk]])
        yield runner.embed(pixels, batch_size=batch_size, flip=flip)


def run_ijb(runner: Any, root: str, *, crop: int | None, batch_size: int = 64, flip: bool = True) -> dict[str, Any]:
    """TAR at FAR 1e-6..1e-1 from `root`'s meta files and face images (one row per face-file line)."""
    from shrinkcli.evaluate.ijb import evaluate_ijb, load_ijb_meta

    root_path = Path(root)
    meta = load_ijb_meta(root_path)
    image_dir = ijb_image_dir(root_path)
    features = np.concatenate(list(_ijb_features(runner, meta.image_names, image_dir, crop=crop,
                                                 batch_size=batch_size, flip=flip)))
    return {"root": str(root_path), "images": len(meta.image_names), **evaluate_ijb(features, meta)}


def run_megaface(runner: Any, probes: str, distractors: str, *, crop: int | None, batch_size: int = 64,
                 flip: bool = True) -> dict[str, Any]:
    """MegaFace challenge-1 rank-1: each (probe, genuine) trial against every distractor, streamed."""
    from shrinkcli.evaluate.images import embedded_chunks, open_labelled
    from shrinkcli.evaluate.megaface import megaface_rank1

    probe_set = open_labelled(probes, input_size=runner.input_size, crop=crop)
    probe_emb = np.concatenate(list(embedded_chunks(runner, probe_set, batch_size=batch_size, flip=flip)))
    distractor_set = open_labelled(distractors, input_size=runner.input_size, crop=crop)
    chunks = embedded_chunks(runner, distractor_set, batch_size=batch_size, flip=flip)
    return {"probes": probes, "distractor_set": distractors,
            **megaface_rank1(probe_emb, np.asarray(probe_set.labels), chunks)}
