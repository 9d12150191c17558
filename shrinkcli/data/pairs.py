"""Verification pairs: `PairSet` and `load_pairs(spec)`.

Specs: `X.bin` (insightface pack), `lfw:ROOT` (pairs.txt, all 10 folds), `lfw-half:ROOT`
(folds 5-9, renumbered 0-4), `lfw-half-val:ROOT` (600 seeded pairs of the held-out training
identities, see shrinkcli.data.splits), `pairs:N[:SEED]@DATASPEC` (balanced seeded pairs from a labelled
dataset), or a `pairs.txt` path with `data_root` (the image root).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from shrinkcli.data.binpack import load_bin
from shrinkcli.data.pairset import PairSet, decode_many
from shrinkcli.data.splits import (LFW_HALF_TEST_FOLDS, lfw_image_dir, lfw_image_name, lfw_pairs_file,
                                   parse_pairs_file)
from shrinkcli.data.transforms import decode_image
from shrinkcli.errors import BadInputError


def pairs_from_file(pairs_path: str | os.PathLike, image_root: str | os.PathLike, *, folds=None,
                    input_size: int = 112, crop: int | None = None, source: str = "") -> PairSet:
    lines = parse_pairs_file(pairs_path)
    if folds is not None:
        keep = set(folds)
        lines = [pair for pair in lines if pair.fold in keep]
    image_root = Path(image_root)
    names: list[str] = []
    position: dict[str, int] = {}

    def slot(name: str, number: int) -> int:
        key = lfw_image_name(name, number)
        if key not in position:
            position[key] = len(names)
            names.append(key)
        return position[key]

    left = [slot(p.name1, p.index1) for p in lines]
    right = [slot(p.name2, p.index2) for p in lines]
    missing = [name for name in names if not (image_root / name).is_file()]
    if missing:
        raise BadInputError(f"{len(missing)} images named in {pairs_path} are missing under {image_root}, "
                            f"e.g. {missing[0]}", hint="pass the image root that matches the pairs file")
    loaders = [lambda n=name: decode_image(image_root / n, input_size=input_size, crop=crop) for name in names]
    fold_ids = np.asarray([p.fold for p in lines])
    fold_ids = np.unique(fold_ids, return_inverse=True)[1]  # renumber 0..k-1 (lfw-half: 5-9 -> 0-4)
    return PairSet(decode_many(loaders), left, right, [p.same for p in lines], fold_ids, names, source or str(pairs_path))


def build_pairs(labels: np.ndarray, count: int, *, seed: int = 0, nfolds: int = 10):
    """Balanced seeded pairs from labels: count//2 same-identity and the rest different-identity
    pairs, shuffled, each assigned to one of `nfolds` equal folds. Returns (left, right, issame, folds)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    by_label: dict[int, np.ndarray] = {int(l): np.flatnonzero(labels == l) for l in np.unique(labels)}
    multi = [l for l, idx in by_label.items() if len(idx) >= 2]
    if not multi:
        raise BadInputError("cannot build same-identity pairs: no identity has two or more images")
    if len(by_label) < 2:
        raise BadInputError("cannot build different-identity pairs: only one identity")
    if count < 2:
        raise BadInputError(f"pairs count must be >= 2, got {count}")
    same_count = count // 2
    pairs: set[tuple[int, int]] = set()
    left, right, same = [], [], []
    attempts = 0
    while len(left) < count and attempts < count * 50:
        attempts += 1
        want_same = len(left) < same_count
        if want_same:
            members = by_label[multi[rng.integers(len(multi))]]
            a, b = rng.choice(members, size=2, replace=False)
        else:
            a, b = rng.integers(len(labels), size=2)
            if labels[a] == labels[b]:
                continue
        key = (min(a, b), max(a, b))
        if key in pairs and attempts < count * 10:
            continue  # prefer distinct pairs; allow repeats only for tiny datasets
        pairs.add(key)
        left.append(int(a)); right.append(int(b)); same.append(want_same)
    order = rng.permutation(len(left))
    folds = (np.arange(len(left)) * nfolds) // len(left)
    return (np.asarray(left)[order], np.asarray(right)[order], np.asarray(same)[order], folds)


def pairs_from_dataset(dataset, count: int, *, seed: int = 0, source: str = "") -> PairSet:
    left, right, issame, folds = build_pairs(dataset.labels, count, seed=seed)
    used, remap = np.unique(np.concatenate([left, right]), return_inverse=True)
    loaders = [lambda i=int(i): dataset.load_uint8(i) for i in used]
    names = [dataset.describe(int(i)) for i in used]
    return PairSet(decode_many(loaders), remap[: len(left)], remap[len(left):], issame, folds, names, source)


def lfw_half_val_pairs(root: str | os.PathLike, *, input_size: int = 112, crop: int | None = None,
                       source: str = "") -> PairSet:
    """Balanced seeded pairs over the images of the held-out lfw-half validation identities."""
    from shrinkcli.data.folder import FolderDataset
    from shrinkcli.data.splits import LFW_HALF_VAL_PAIRS, LFW_HALF_VAL_SEED, lfw_half_validation_split

    held_out, _ = lfw_half_validation_split(root)
    dataset = FolderDataset(lfw_image_dir(root), identities=held_out, input_size=input_size, crop=crop)
    return pairs_from_dataset(dataset, LFW_HALF_VAL_PAIRS, seed=LFW_HALF_VAL_SEED, source=source or f"lfw-half-val:{root}")


def _parse_built_pairs(spec: str) -> tuple[int, int, str]:
    head, sep, data_spec = spec[len("pairs:"):].partition("@")
    count_text, _, seed_text = head.partition(":")
    try:
        count, seed = int(count_text), int(seed_text or 0)
    except ValueError:
        count = seed = -1
    if not sep or count < 2 or seed < 0:
        raise BadInputError(f"pairs spec {spec!r} is not `pairs:N[:SEED]@DATASPEC`",
                            hint="e.g. pairs:600@synthetic:20:10:1")
    return count, seed, data_spec


def load_pairs(spec: str, *, data_root: str | os.PathLike | None = None, input_size: int = 112,
               crop: int | None = None) -> PairSet:
    spec = str(spec)
    if spec.startswith("pairs:"):
        from shrinkcli.data.spec import open_dataset

        count, seed, data_spec = _parse_built_pairs(spec)
        if not data_spec:
            if data_root is None:
                raise BadInputError(f"pairs spec {spec!r} names no dataset", hint="use pairs:N@DATASPEC or pass --data")
            data_spec = str(data_root)
        dataset = open_dataset(data_spec, input_size=input_size, crop=crop)
        return pairs_from_dataset(dataset, count, seed=seed, source=spec)
    if spec.startswith("lfw-half-val:"):
        return lfw_half_val_pairs(spec.partition(":")[2], input_size=input_size, crop=crop, source=spec)
    if spec.startswith("lfw:") or spec.startswith("lfw-half:"):
        kind, _, root = spec.partition(":")
        folds = LFW_HALF_TEST_FOLDS if kind == "lfw-half" else None
        return pairs_from_file(lfw_pairs_file(root), lfw_image_dir(root), folds=folds, input_size=input_size,
                               crop=crop, source=spec)
    path = Path(spec)
    if spec.endswith(".bin") or (path.is_file() and path.suffix == ".bin"):
        return load_bin(path, input_size=input_size, crop=crop)
    if path.is_file() and path.suffix == ".txt":
        root_text = str(data_root) if data_root is not None else ""
        root = Path(root_text.removeprefix("folder:")) if root_text else lfw_image_dir(path.parent)
        return pairs_from_file(path, root, input_size=input_size, crop=crop, source=spec)
    if path.is_dir() and (path / "pairs.txt").is_file():
        return pairs_from_file(path / "pairs.txt", lfw_image_dir(path), input_size=input_size, crop=crop, source=spec)
    raise BadInputError(f"unknown pairs spec {spec!r}",
                        hint="use X.bin, lfw:ROOT, lfw-half:ROOT, lfw-half-val:ROOT, a pairs.txt (with --data), or pairs:N@DATASPEC")
