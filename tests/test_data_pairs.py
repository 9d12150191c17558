import io
import os
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from shrinkcli.data import build_pairs, load_pairs, open_dataset
from shrinkcli.data.binpack import read_bin, write_bin
from shrinkcli.data.recordio import MAGIC_BYTES, RecordFile, unpack_header
from shrinkcli.data.splits import parse_pairs_file
from shrinkcli.errors import BadInputError


def _jpeg(value):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (value, value, value)).save(buffer, format="JPEG")
    return buffer.getvalue()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/shrink_pwned_marker",))


def test_malicious_bin_refused_and_nothing_executed(tmp_path):
    marker = "/tmp/shrink_pwned_marker"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Exploit(), b"x"], [True])))
    with pytest.raises(BadInputError, match=r"evil\.bin.*(posix|os)\.system"):
        load_pairs(str(path))
    assert not os.path.exists(marker)


def test_bin_bytes_numpy_and_protocol2(tmp_path):
    images = [_jpeg(v) for v in (10, 10, 50, 200)]
    path = write_bin(tmp_path / "a.bin", images, [True, False])
    pairs = load_pairs(str(path), input_size=8)
    assert list(pairs.issame) == [True, False] and pairs.images.shape == (4, 3, 8, 8)
    assert list(pairs.left) == [0, 2] and list(pairs.right) == [1, 3]
    numpy_pack = tmp_path / "np.bin"
    numpy_pack.write_bytes(pickle.dumps(([np.frombuffer(b, np.uint8) for b in images], np.array([True, False])), protocol=2))
    assert read_bin(numpy_pack)[0] == images
    (tmp_path / "bad.bin").write_bytes(b"not a pickle")
    with pytest.raises(BadInputError, match="bad.bin"):
        read_bin(tmp_path / "bad.bin")


def _write_lfw(root, header, lines):
    for name, count in (("A", 3), ("B", 2), ("C", 1), ("D", 2)):
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        for i in range(1, count + 1):
            Image.new("RGB", (40, 40), (i * 20, 0, 0)).save(root / "images" / name / f"{name}_{i:04d}.jpg")
    (root / "pairs.txt").write_text(header + "\n" + "\n".join(lines) + "\n")


def test_pairs_txt_both_headers(tmp_path):
    folds_layout = ["A 1 2", "C 1 D 1", "B 1 2", "A 3 B 2"]
    _write_lfw(tmp_path, "2 1", folds_layout)
    pairs = parse_pairs_file(tmp_path / "pairs.txt")
    assert [(p.same, p.fold) for p in pairs] == [(True, 0), (False, 0), (True, 1), (False, 1)]
    loaded = load_pairs(f"lfw:{tmp_path}", input_size=8, crop=20)
    assert list(loaded.issame) == [True, False, True, False] and list(loaded.folds) == [0, 0, 1, 1]
    assert loaded.images.shape[0] == 7  # unique images only
    single = tmp_path / "single"
    _write_lfw(single, "2", ["A 1 2", "B 1 2", "C 1 D 1", "A 3 B 2"])
    assert [p.same for p in parse_pairs_file(single / "pairs.txt")] == [True, True, False, False]
    (single / "pairs.txt").write_text("3\nA 1 2\n")
    with pytest.raises(BadInputError, match="promises 6"):
        parse_pairs_file(single / "pairs.txt")


def test_build_pairs_balanced_seeded_and_from_spec():
    labels = np.repeat(np.arange(6), 3)
    left, right, same, folds = build_pairs(labels, 40, seed=3)
    assert same.sum() == 20 and (labels[left] == labels[right]).tolist() == same.tolist()
    assert sorted(set(folds.tolist())) == list(range(10))
    again = build_pairs(labels, 40, seed=3)
    assert (again[0] == left).all()
    pairs = load_pairs("pairs:20:1@synthetic:5:3:9", input_size=16)
    assert len(pairs) == 20 and pairs.issame.sum() == 10 and pairs.images.dtype.is_floating_point is False


def test_lfw_half_counts(lfw_root):
    train = open_dataset(f"lfw-half:{lfw_root}", input_size=32, crop=128)
    assert (train.num_classes, len(train)) == (2086, 5373)
    counts = train.identity_counts()
    assert (counts >= 2).sum() == 774 and counts[counts >= 2].sum() == 4061
    lines = parse_pairs_file(lfw_root / "pairs.txt")
    test_names = {n for p in lines if p.fold >= 5 for n in (p.name1, p.name2)}
    assert not test_names & set(train.class_names)  # open set: no test identity in training
    assert sum(p.fold >= 5 for p in lines) == 3000


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), offset=st.integers(0, 64), inject=st.booleans())
def test_recordio_parser_fuzz(tmp_path, data, offset, inject):
    """Arbitrary bytes never give anything but a clean result or BadInputError."""
    if inject:  # make the framing plausible so deeper paths (splits, headers) get exercised
        data = MAGIC_BYTES + data[:4] + MAGIC_BYTES + data
    path = tmp_path / "fuzz.rec"
    path.write_bytes(data)
    rec = RecordFile(path)
    try:
        payload, _ = rec.read(offset)
        unpack_header(payload, "fuzz")
        list(rec.scan())
    except BadInputError:
        pass
