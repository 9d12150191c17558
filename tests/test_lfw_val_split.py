"""The lfw-half validation split: held-out training identities for tuning, never the test pairs."""

from pathlib import Path

import numpy as np
from PIL import Image

from shrinkcli.data import load_pairs, open_dataset
from shrinkcli.data.splits import lfw_half_validation_split, parse_pairs_file


def _fake_lfw(root: Path) -> Path:
    """10 folds x (2 same + 2 different lines): per fold 6 identities, 3 of them with two images."""
    lines, images = [], {}
    for fold in range(10):
        a0, a1, b0, b1, b2, b3 = (f"P{fold}_{k}" for k in range(6))
        lines += [f"{a0} 1 2", f"{a1} 1 2", f"{b0} 1 {b1} 1", f"{b2} 1 {b3} 1"]   # header `10 2` layout
        images.update({a0: 2, a1: 3, b0: 2, b1: 1, b2: 1, b3: 1})
    for index, (name, count) in enumerate(sorted(images.items())):
        (root / "images" / name).mkdir(parents=True)
        for i in range(1, count + 1):
            Image.new("RGB", (40, 40), (index * 4 % 256, i * 60, 90)).save(root / "images" / name / f"{name}_{i:04d}.jpg")
    (root / "pairs.txt").write_text("10 2\n" + "\n".join(lines) + "\n")
    return root


def test_split_holds_out_a_seeded_tenth_of_the_multi_image_training_identities(tmp_path):
    root = _fake_lfw(tmp_path)
    val, train = lfw_half_validation_split(root)
    folds_0_4 = {f"P{f}_{k}" for f in range(5) for k in range(6)}
    multi = {f"P{f}_{k}" for f in range(5) for k in (0, 1, 2)}
    assert len(val) == round(0.1 * len(multi)) == 2 and set(val) <= multi
    assert set(train) == folds_0_4 - set(val) and not set(train) & set(val)
    assert lfw_half_validation_split(root) == (val, train)                     # seeded: the same every time
    tested = {n for p in parse_pairs_file(root / "pairs.txt") if p.fold >= 5 for n in (p.name1, p.name2)}
    assert not tested & (set(val) | set(train))

    trainset = open_dataset(f"lfw-half-train:{root}", input_size=16)
    assert trainset.class_names == sorted(train) and open_dataset(f"lfw-half:{root}", input_size=16).num_classes == 30

    pairs = load_pairs(f"lfw-half-val:{root}", input_size=16)
    assert len(pairs) == 600 and pairs.issame.sum() == 300 and pairs.images.shape[1:] == (3, 16, 16)
    owners = [Path(name).parent.name for name in pairs.names]
    assert set(owners) <= set(val)
    same = np.array([owners[a] == owners[b] for a, b in zip(pairs.left, pairs.right)])
    assert (same == pairs.issame).all() and sorted(set(pairs.folds.tolist())) == list(range(10))


def test_split_on_real_lfw(lfw_root):
    val, train = lfw_half_validation_split(lfw_root)
    assert (len(val), len(train)) == (77, 2086 - 77)                # 10% of the 774 identities with >= 2 images
    trainset = open_dataset(f"lfw-half-train:{lfw_root}", input_size=16, crop=128)
    full = open_dataset(f"lfw-half:{lfw_root}", input_size=16, crop=128)
    counts = full.identity_counts()
    held = [counts[full.class_names.index(name)] for name in val]
    assert min(held) >= 2 and len(trainset) == len(full) - sum(held)
    tested = {n for p in parse_pairs_file(lfw_root / "pairs.txt") if p.fold >= 5 for n in (p.name1, p.name2)}
    assert not tested & (set(val) | set(trainset.class_names))
    pairs = load_pairs(f"lfw-half-val:{lfw_root}", input_size=16, crop=128)
    assert len(pairs) == 600 and pairs.issame.sum() == 300
    assert {Path(name).parent.name for name in pairs.names} <= set(val)
