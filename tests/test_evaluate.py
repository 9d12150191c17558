"""Verification protocol, TAR@FAR, parity, bootstrap and embed: numbers checked by hand or by a
direct (slow, loop-based) computation."""

from types import SimpleNamespace

import numpy as np
import pytest

from shrinkcli.errors import BadInputError
from shrinkcli.evaluate import embed
from shrinkcli.evaluate.bootstrap import paired_bootstrap
from shrinkcli.evaluate.parity import parity
from shrinkcli.evaluate.verification import (THRESHOLDS, evaluate_distances, evaluate_pairs, fold_ids,
                                            pair_distances, tar_at_far)


def _pairs(left, right, issame, folds=None):
    return SimpleNamespace(left=np.asarray(left), right=np.asarray(right), issame=np.asarray(issame, bool),
                           folds=None if folds is None else np.asarray(folds))


def test_perfectly_separable_pairs_score_100_percent():
    rng = np.random.default_rng(0)
    ids = np.linalg.qr(rng.normal(size=(64, 64)))[0][:40]   # 40 orthonormal identity directions
    emb = np.repeat(ids, 2, axis=0) + 0.01 * rng.normal(size=(80, 64))
    same = [(2 * i, 2 * i + 1) for i in range(40)]
    diff = [(2 * i, 2 * ((i + 1) % 40)) for i in range(40)]
    left, right = zip(*(same + diff))
    result = evaluate_pairs(emb, _pairs(left, right, [True] * 40 + [False] * 40), nfolds=10)
    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0
    assert 0.0 < result["threshold"] < 2.0           # orthogonal different pairs sit at distance 2
    assert result["tar_at_far"]["1e-01"] == 1.0
    assert result["far_skipped"] == ["1e-02", "1e-03", "1e-04"]   # 40 negatives support only 1e-1


def test_random_embeddings_score_about_chance():
    n = 2000
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(2 * n, 32))
    issame = rng.random(n) < 0.5
    result = evaluate_pairs(emb, _pairs(np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2), issame))
    tolerance = 4 * 0.5 / np.sqrt(n)     # four standard errors of a fair-coin accuracy
    assert abs(result["accuracy"] - 0.5) < tolerance


def _direct_kfold(dist, issame, folds):
    accuracies = []
    for fold in np.unique(folds):
        best_acc, best_thr = -1.0, None
        for thr in THRESHOLDS:
            hits = sum((d < thr) == s for d, s, f in zip(dist, issame, folds) if f != fold)
            acc = hits / sum(folds != fold)
            if acc > best_acc:
                best_acc, best_thr = acc, thr
        test = [(d < best_thr) == s for d, s, f in zip(dist, issame, folds) if f == fold]
        accuracies.append(np.mean(test))
    return np.mean(accuracies), np.std(accuracies)


def test_kfold_matches_direct_computation():
    rng = np.random.default_rng(2)
    issame = rng.random(37) < 0.5
    dist = np.where(issame, rng.uniform(0.3, 1.6, 37), rng.uniform(1.0, 2.4, 37)).round(3)
    for folds in (fold_ids(37, 4), rng.integers(0, 3, 37)):
        got = evaluate_distances(dist, issame, folds=folds)
        mean, std = _direct_kfold(dist, issame, folds)
        assert got["accuracy"] == pytest.approx(mean) and got["accuracy_std"] == pytest.approx(std)


def test_contiguous_folds_are_sized_like_kfold():
    folds = fold_ids(23, 5)
    assert np.bincount(folds).tolist() == [5, 5, 5, 4, 4]
    assert np.all(np.diff(folds) >= 0)
    with pytest.raises(BadInputError):
        fold_ids(3, 10)


def test_pairs_folds_take_precedence_and_correctness_is_per_pair():
    issame = np.array([1, 0, 1, 0, 1, 0, 1, 0], bool)
    dist = np.array([0.3, 1.5, 0.3, 1.4, 0.3, 0.2, 0.3, 1.6])
    result = evaluate_distances(dist, issame, folds=np.array([0, 0, 1, 1, 2, 2, 3, 3]), details=True)
    assert result["folds"] == 4 and result["folds_from"] == "pairs"
    # fold 2 holds the one hard negative (0.2, nearer than every positive): the rest are right
    assert result["correct"].tolist() == [True] * 5 + [False] + [True] * 2
    assert result["accuracy"] == pytest.approx(np.mean([1, 1, 0.5, 1]))


def test_tar_at_far_hand_case():
    impostor = np.arange(1, 11) / 10.0                 # 0.1 .. 1.0
    genuine = np.array([0.05, 0.15, 0.5, 2.0])
    result, skipped = tar_at_far(genuine, impostor, (1e-1, 1e-2))
    # FAR 0.1 of 10 impostors: one may pass -> threshold is the 2nd smallest distance, 0.2
    assert result["1e-01"] == {"tar": 0.5, "far": 0.1, "threshold": 0.2}
    assert skipped == ["1e-02"]
    scores, _ = tar_at_far(-genuine, -impostor, (1e-1,), higher_is_same=True)
    assert scores["1e-01"]["tar"] == 0.5 and scores["1e-01"]["threshold"] == pytest.approx(-0.2)


def test_pair_distance_rejects_out_of_range_index():
    with pytest.raises(BadInputError, match="outside"):
        pair_distances(np.ones((3, 4)), [0, 1], [2, 3])


def test_one_class_pairs_are_refused():
    with pytest.raises(BadInputError, match="both same and different"):
        evaluate_distances(np.array([0.1, 0.2]), np.array([True, True]), nfolds=2)


def test_parity_identical_tampered_and_normalised():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(16, 8))
    same = parity(a, a.copy())
    assert same["max_abs_diff"] == 0.0 and same["min_cosine"] == pytest.approx(1.0)
    b = a.copy()
    b[0] = -b[0]
    broken = parity(a, b)
    assert broken["min_cosine"] == pytest.approx(-1.0) and broken["mean_cosine"] == pytest.approx(14 / 16)
    unit = a / np.linalg.norm(a, axis=1, keepdims=True)
    mixed = parity(a, unit)
    assert mixed["compared_normalized"] and mixed["max_abs_diff"] < 1e-12
    with pytest.raises(BadInputError, match="shapes differ"):
        parity(a, a[:, :4])


def test_bootstrap_ci_contains_true_difference_and_excludes_zero():
    rng = np.random.default_rng(4)
    n = 3000
    a = rng.random(n) < 0.80
    # B fixes a known 40% of A's errors and breaks nothing: true difference 0.4 * (1 - acc_A)
    b = a | ((rng.random(n) < 0.4) & ~a)
    true_diff = b.mean() - a.mean()
    result = paired_bootstrap(a, b, resamples=1000, seed=0)
    assert result["difference"] == pytest.approx(true_diff)
    assert result["ci_low"] < true_diff < result["ci_high"]
    assert result["excludes_zero"] and result["ci_low"] > 0
    again = paired_bootstrap(a, b, resamples=1000, seed=0)
    assert again == result                               # seeded: reproducible


def test_bootstrap_over_seeds_widens_the_ci_by_training_noise():
    rng = np.random.default_rng(6)
    a = (rng.random((3, 3000)) < 0.80).astype(float)
    b = np.stack([(rng.random(3000) < p).astype(float) for p in (0.78, 0.83, 0.88)])   # seeds scatter 5 pt
    pairs_only = paired_bootstrap(a.mean(0), b.mean(0), resamples=1000, seed=0)
    both = paired_bootstrap(a, b, resamples=1000, seed=0)
    assert pairs_only["resampled"] == "pairs" and both["resampled"] == "pairs and seeds"
    assert both["difference"] == pytest.approx(pairs_only["difference"])
    assert pairs_only["excludes_zero"] and not both["excludes_zero"]
    assert (both["ci_high"] - both["ci_low"]) > 2 * (pairs_only["ci_high"] - pairs_only["ci_low"])
    single = paired_bootstrap(a[:1], b[:1], resamples=300, seed=2)
    assert single == paired_bootstrap(a[0], b[0], resamples=300, seed=2)   # one seed: the plain paired bootstrap
    with pytest.raises(BadInputError, match="same pairs"):
        paired_bootstrap(a, b[:, :10])


def test_bootstrap_population_difference_is_covered():
    rng = np.random.default_rng(5)
    n = 4000
    a = (rng.random(n) < 0.80).astype(float)
    b = (rng.random(n) < 0.83).astype(float)            # population difference 0.03
    result = paired_bootstrap(a, b, resamples=1000, seed=1)
    assert result["ci_low"] < 0.03 < result["ci_high"]
    tie = paired_bootstrap(a, a, resamples=200, seed=0)
    assert tie["difference"] == 0.0 and not tie["excludes_zero"]


def test_embed_flip_sum_and_normalisation():
    import torch

    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    weights = torch.randn(3 * 8 * 8, 4)

    def linear(x):
        return x.flatten(1) @ weights

    emb = embed(linear, images, mean=127.5, std=127.5, batch_size=2)
    x = (images.float() - 127.5) / 127.5
    expected = linear(x) + linear(torch.flip(x, dims=[3]))
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert emb.shape == (5, 4) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, expected.numpy(), atol=1e-5)
    no_flip = embed(linear, images.numpy(), flip=False)
    np.testing.assert_allclose(np.linalg.norm(no_flip, axis=1), 1.0, atol=1e-5)
