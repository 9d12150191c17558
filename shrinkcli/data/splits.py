"""Identity splits and the LFW pairs file: by identity list, by fold of a pairs file, by a seeded
fraction, and the `lfw-half` open-set preset (train on fold 0-4 identities, test on folds 5-9).

`lfw-half` validation split, for tuning without touching the test pairs: a seeded 10% of the fold
0-4 identities that have two or more images are held out (`lfw-half-val:ROOT` pairs are built from
their images), and `lfw-half-train:ROOT` trains on the other fold 0-4 identities.

`pairs.txt` comes with one of two headers:
- `10 300` (official View 2): 10 folds, each 300 same-person lines then 300 different-person lines;
- `N` (a single number): N same-person lines then N different-person lines; fold k is same lines
  [k*N/10, (k+1)*N/10) plus different lines over the same range (when N divides by 10).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from shrinkcli.errors import BadInputError

LFW_FOLDS = 10
LFW_HALF_TRAIN_FOLDS = (0, 1, 2, 3, 4)
LFW_HALF_TEST_FOLDS = (5, 6, 7, 8, 9)
LFW_HALF_VAL_FRACTION = 0.1     # of the fold 0-4 identities with two or more images
LFW_HALF_VAL_SEED = 0
LFW_HALF_VAL_PAIRS = 600        # balanced: 300 same-identity, 300 different-identity


@dataclass
class PairLine:
    name1: str
    index1: int
    name2: str
    index2: int
    same: bool
    fold: int


def parse_pairs_file(path: str | os.PathLike) -> list[PairLine]:
    path = Path(path)
    try:
        lines = [line.split() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError as exc:
        raise BadInputError(f"cannot read pairs file {path}: {exc.strerror}") from exc
    lines = [line for line in lines if line]
    if not lines:
        raise BadInputError(f"pairs file {path} is empty", hint="expected a header line `10 300` or `N`")
    header, body = lines[0], lines[1:]
    try:
        numbers = [int(value) for value in header]
    except ValueError:
        raise BadInputError(f"pairs file {path}: header {' '.join(header)!r} is not `FOLDS PER_FOLD` or `N`") from None
    # checked before the layout is built: a hostile header must not allocate billions of entries
    promised = 2 * math.prod(numbers)
    if len(numbers) in (1, 2) and min(numbers) >= 0 and promised != len(body):
        raise BadInputError(f"pairs file {path}: header promises {promised} pair lines, found {len(body)}",
                            hint="the file is truncated or the header is wrong")
    if len(numbers) == 2:
        folds, per_fold = numbers
        layout = [(fold, same) for fold in range(folds) for same in (True, False) for _ in range(per_fold)]
    elif len(numbers) == 1:
        count = numbers[0]
        fold_size = count // LFW_FOLDS if count % LFW_FOLDS == 0 else count
        layout = [(i // fold_size, same) for same in (True, False) for i in range(count)]
    else:
        raise BadInputError(f"pairs file {path}: header {' '.join(header)!r} is not `FOLDS PER_FOLD` or `N`")
    if len(body) != len(layout):
        raise BadInputError(f"pairs file {path}: header promises {len(layout)} pair lines, found {len(body)}",
                            hint="the file is truncated or the header is wrong")
    pairs = []
    for line_no, (fields, (fold, expect_same)) in enumerate(zip(body, layout), start=2):
        try:
            if len(fields) == 3:
                pair = PairLine(fields[0], int(fields[1]), fields[0], int(fields[2]), True, fold)
            elif len(fields) == 4:
                pair = PairLine(fields[0], int(fields[1]), fields[2], int(fields[3]), False, fold)
            else:
                raise ValueError
        except ValueError:
            raise BadInputError(f"pairs file {path}, line {line_no}: expected `name i j` or `name1 i name2 j`") from None
        if pair.same != expect_same:
            raise BadInputError(f"pairs file {path}, line {line_no}: a {'same' if expect_same else 'different'}-person "
                                f"line was expected here by the header layout")
        pairs.append(pair)
    return pairs


def lfw_image_dir(root: str | os.PathLike) -> Path:
    """LFW roots come as ROOT/images/<Name>/ (our copy) or ROOT/<Name>/ (the tarball)."""
    root = Path(root)
    return root / "images" if (root / "images").is_dir() else root


def lfw_pairs_file(root: str | os.PathLike) -> Path:
    root = Path(root)
    path = root / "pairs.txt" if root.is_dir() else root
    if not path.is_file():
        raise BadInputError(f"no pairs.txt at {path}", hint="pass the LFW root that holds pairs.txt and the images")
    return path


def lfw_image_name(name: str, number: int) -> str:
    return f"{name}/{name}_{number:04d}.jpg"


def identities_of_folds(pairs: Iterable[PairLine], folds: Sequence[int]) -> list[str]:
    wanted = set(folds)
    names = set()
    for pair in pairs:
        if pair.fold in wanted:
            names.update((pair.name1, pair.name2))
    return sorted(names)


def split_by_fraction(names: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded identity split: (first `fraction` of the shuffled names, the rest), each sorted."""
    if not 0.0 < fraction < 1.0:
        raise BadInputError(f"split fraction must lie in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(names))
    cut = int(round(len(names) * fraction))
    chosen = sorted(names[i] for i in order[:cut])
    rest = sorted(names[i] for i in order[cut:])
    return chosen, rest


def lfw_half_train_identities(root: str | os.PathLike) -> list[str]:
    return identities_of_folds(parse_pairs_file(lfw_pairs_file(root)), LFW_HALF_TRAIN_FOLDS)


def lfw_half_validation_split(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(held-out validation identities, remaining training identities) of the lfw-half fold 0-4 set."""
    from shrinkcli.data.folder import is_image_file

    names = lfw_half_train_identities(root)
    image_dir = lfw_image_dir(root)

    def images_of(name: str) -> int:
        try:
            return sum(1 for entry in os.scandir(image_dir / name) if entry.is_file() and is_image_file(entry.name))
        except OSError:
            return 0

    multi = [name for name in names if images_of(name) >= 2]
    if len(multi) < 2:
        raise BadInputError(f"{root}: {len(multi)} fold 0-4 identities have two or more images; "
                            "a validation split needs at least 2", hint="check the LFW root")
    val, _ = split_by_fraction(multi, LFW_HALF_VAL_FRACTION, seed=LFW_HALF_VAL_SEED)
    if len(val) < 2:        # tiny layouts: different-identity pairs need two held-out identities
        order = np.random.default_rng(LFW_HALF_VAL_SEED).permutation(len(multi))
        val = sorted(multi[i] for i in order[:2])
    held = set(val)
    return val, [name for name in names if name not in held]
