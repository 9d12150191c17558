"""Rank-1 identification, MegaFace distractors and IJB template pooling on small known cases."""

import numpy as np
import pytest

from shrinkcli.errors import BadInputError
from shrinkcli.evaluate.identification import rank1, rank1_from_labelled, split_probe_gallery
from shrinkcli.evaluate.ijb import evaluate_ijb, load_ijb_meta, template_features
from shrinkcli.evaluate.megaface import megaface_rank1


def _unit(*rows):
    x = np.asarray(rows, dtype=float)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_split_first_image_is_gallery():
    labels = np.array([5, 5, 7, 9, 9, 9, 7, 3])
    gallery, probes = split_probe_gallery(labels)
    assert gallery.tolist() == [0, 2, 3, 7]              # 3 has one image: a gallery-only distractor
    assert probes.tolist() == [1, 4, 5, 6]


def test_rank1_with_and_without_distractors():
    gallery = _unit([1, 0, 0], [0, 1, 0])
    probes = _unit([1, 0.2, 0], [0.1, 1, 0], [0.6, 0.5, 0.6])
    labels = np.array([0, 1, 0])
    plain = rank1(probes, labels, gallery, np.array([0, 1]))
    assert plain["rank1"] == 1.0
    # a distractor close to the third probe steals its rank-1; chunks of one row exercise blocking
    distractors = _unit([0.6, 0.5, 0.62], [0, 0, -1])
    hard = rank1(probes, labels, gallery, np.array([0, 1]), distractors, block=1)
    assert hard["rank1"] == pytest.approx(2 / 3) and hard["distractors"] == 2
    streamed = rank1(probes, labels, gallery, np.array([0, 1]), iter([distractors[:1], distractors[1:]]))
    assert streamed["rank1"] == hard["rank1"]


def test_rank1_from_labelled_set():
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.normal(size=(16, 16)))[0][:6]
    labels = np.repeat(np.arange(6), 3)
    emb = centres[labels] + 0.05 * rng.normal(size=(18, 16))
    result = rank1_from_labelled(emb, labels)
    assert result["rank1"] == 1.0 and result["probes"] == 12 and result["gallery"] == 6
    with pytest.raises(BadInputError, match="probe"):
        rank1_from_labelled(emb[:6:3], labels[:6:3])


def test_megaface_rank1_known_answer():
    # identity 0: three images; identity 1: two images
    probes = _unit([1, 0, 0], [0.9, 0.3, 0], [0.2, 1, 0], [0, 0, 1], [0, 0.3, 1])
    labels = np.array([0, 0, 0, 1, 1])
    # one distractor at [0.5, 1, 0]: beats the weak genuine matches of identity 0's third image
    distractors = _unit([0.5, 1, 0], [-1, 0, 0])
    result = megaface_rank1(probes, labels, distractors, block=1)
    sims = probes @ probes.T
    best_d = (probes @ distractors.T).max(1)
    expected = [sims[i, j] > best_d[i] for i, j in [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (3, 4), (4, 3)]]
    assert result["trials"] == 8 and result["rank1"] == pytest.approx(np.mean(expected))
    assert 0 < result["rank1"] < 1
    assert result["distractors"] == 2


def _write_ijb(root, faces, pairs):
    meta = root / "meta"
    meta.mkdir(parents=True)
    (meta / "ijbc_face_tid_mid.txt").write_text("".join(f"img{i}.jpg {t} {m}\n" for i, (t, m) in enumerate(faces)))
    (meta / "ijbc_template_pair_label.txt").write_text("".join(f"{a} {b} {l}\n" for a, b, l in pairs))


def test_ijb_template_pooling_and_tar(tmp_path):
    # template 1: media 10 has two frames (e1, e2), media 11 one image (e1)
    # -> media means (e1+e2)/2 and e1, summed: 1.5 e1 + 0.5 e2 -> normalised
    faces = [(1, 10), (1, 10), (1, 11), (2, 20), (3, 30), (3, 31)]
    feats = np.array([[1, 0, 0], [0, 1, 0], [2, 0, 0], [0, 0, 5], [0, 0, 1], [0.1, 0, 1]], float)
    pairs = [(1, 2, 0), (1, 3, 0), (2, 3, 1)] + [(1, 1, 1)] + [(2, 1, 0)] * 7
    _write_ijb(tmp_path, faces, pairs)
    meta = load_ijb_meta(tmp_path)
    assert meta.image_names[0] == "img0.jpg" and meta.pair_label.sum() == 2
    pooled, ids = template_features(feats, meta.templates, meta.medias)
    assert ids.tolist() == [1, 2, 3]
    expected = np.array([1.5, 0.5, 0]) / np.linalg.norm([1.5, 0.5, 0])
    np.testing.assert_allclose(pooled[0], expected)
    result = evaluate_ijb(feats, meta)
    # 9 negatives, all scoring ~0 (orthogonal templates), genuine scores ~1: perfect separation,
    # but 9 negatives support no FAR target at all (1e-1 needs 10)
    assert result["tar_at_far"] == {} and len(result["far_skipped"]) == 6
    _write_ijb(tmp_path / "more", faces, pairs + [(3, 1, 0)])
    result = evaluate_ijb(feats, load_ijb_meta(tmp_path / "more"))
    assert result["tar_at_far"] == {"1e-01": 1.0} and result["negatives"] == 10


def test_ijb_missing_files_and_unknown_template(tmp_path):
    with pytest.raises(BadInputError, match="face_tid_mid"):
        load_ijb_meta(tmp_path)
    _write_ijb(tmp_path, [(1, 1), (2, 2)], [(1, 9, 0), (1, 2, 1)])
    with pytest.raises(BadInputError, match="no face images"):
        evaluate_ijb(np.eye(2), load_ijb_meta(tmp_path))
