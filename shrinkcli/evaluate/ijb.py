"""IJB-B / IJB-C 1:1 template verification from the standard meta files.

Files (in `<root>/meta/` or `<root>/`, prefix `ijbb` or `ijbc`):
- `<prefix>_face_tid_mid.txt`: `image_name template_id media_id` per face image;
- `<prefix>_template_pair_label.txt`: `template1 template2 label` (1 same, 0 different).

Features (one row per line of the face file, in that order) are L2-normalised, averaged within
each (template, media) group, the media features of a template are summed and the template
feature is L2-normalised; a pair's score is the cosine of its two template features. This is the
pooling of insightface's IJB evaluation (without the optional detector-score weighting).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shrinkcli.errors import BadInputError
from shrinkcli.evaluate.verification import l2_normalize, tar_at_far

IJB_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class IJBMeta:
    image_names: list[str]
    templates: np.ndarray      # per image
    medias: np.ndarray         # per image
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    pair_label: np.ndarray     # bool


def _find(root: Path, suffix: str) -> Path:
    for folder in (root / "meta", root):
        hits = sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []
        if hits:
            return hits[0]
    raise BadInputError(f"IJB: no *{suffix} under {root} or {root / 'meta'}",
                        hint="point at the IJB-B/IJB-C folder that holds the meta files")


def _read_columns(path: Path, columns: int) -> list[list[str]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < columns:
            raise BadInputError(f"{path}:{number}: expected {columns} columns, got {len(parts)}")
        rows.append(parts[:columns])
    if not rows:
        raise BadInputError(f"{path} is empty")
    return rows


def load_ijb_meta(root: str | Path) -> IJBMeta:
    root = Path(root)
    faces = _read_columns(_find(root, "_face_tid_mid.txt"), 3)
    pairs_path = _find(root, "_template_pair_label.txt")
    pairs = _read_columns(pairs_path, 3)
    try:
        templates = np.array([int(r[1]) for r in faces], dtype=np.int64)
        medias = np.array([int(r[2]) for r in faces], dtype=np.int64)
        pair_values = np.array([[int(v) for v in r] for r in pairs], dtype=np.int64)
    except ValueError as exc:
        raise BadInputError(f"IJB meta under {root}: non-integer id ({exc})") from exc
    return IJBMeta([r[0] for r in faces], templates, medias, pair_values[:, 0], pair_values[:, 1],
                   pair_values[:, 2].astype(bool))


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normalised template features, template ids), pooled media-first as described above."""
    features = l2_normalize(features)
    if len(features) != len(templates):
        raise BadInputError(f"IJB: {len(features)} features for {len(templates)} face images")
    groups, group_of_image = np.unique(np.stack([templates, medias], 1), axis=0, return_inverse=True)
    group_of_image = group_of_image.reshape(-1)
    media_sum = np.zeros((len(groups), features.shape[1]))
    np.add.at(media_sum, group_of_image, features)
    media_mean = media_sum / np.bincount(group_of_image, minlength=len(groups))[:, None]
    template_ids, template_of_group = np.unique(groups[:, 0], return_inverse=True)
    pooled = np.zeros((len(template_ids), features.shape[1]))
    np.add.at(pooled, template_of_group.reshape(-1), media_mean)
    return l2_normalize(pooled), template_ids


def pair_scores(template_feats: np.ndarray, template_ids: np.ndarray, t1: np.ndarray, t2: np.ndarray,
                *, block: int = 100_000) -> np.ndarray:
    """Cosine score of each template pair, in blocks (IJB-C has 15.7M pairs)."""
    position = np.searchsorted(template_ids, t1), np.searchsorted(template_ids, t2)
    for ids, pos in zip((t1, t2), position):
        inside = pos < len(template_ids)
        if not inside.all() or not np.array_equal(template_ids[pos], ids):
            raise BadInputError("IJB: a template pair names a template with no face images")
    scores = np.empty(len(t1))
    for start in range(0, len(t1), block):
        end = start + block
        scores[start:end] = np.sum(template_feats[position[0][start:end]] * template_feats[position[1][start:end]], axis=1)
    return scores


def evaluate_ijb(features: np.ndarray, meta: IJBMeta, far_targets=IJB_FAR_TARGETS) -> dict[str, Any]:
    feats, ids = template_features(features, meta.templates, meta.medias)
    scores = pair_scores(feats, ids, meta.pair_t1, meta.pair_t2)
    tar, skipped = tar_at_far(scores[meta.pair_label], scores[~meta.pair_label], far_targets,
                              higher_is_same=True)
    return {"tar_at_far": {k: v["tar"] for k, v in tar.items()}, "tar_at_far_detail": tar,
            "far_skipped": skipped, "templates": int(len(ids)), "pairs": int(len(scores)),
            "positives": int(meta.pair_label.sum()), "negatives": int((~meta.pair_label).sum())}
