"""1:1 face verification on pairs: the insightface k-fold protocol, TAR@FAR and ROC points.

Embeddings are L2-normalised, a pair's score is the squared L2 distance (0..4 for unit vectors)
and a pair is predicted "same" when its distance is below a threshold. The threshold is chosen
on k-1 folds (grid 0..4 step 0.01, first best on ties, as insightface does) and applied to the
held-out fold; accuracy is the mean (+- std) over the held-out folds.

Everything here is numpy only: counts at all thresholds come from sorted distances, so the cost
is O(n log n) however many pairs and thresholds there are.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from shrinkcli.errors import BadInputError

THRESHOLDS = np.round(np.arange(0.0, 4.0 + 1e-9, 0.01), 2)
FAR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def pair_distances(emb: np.ndarray, left: Sequence[int], right: Sequence[int]) -> np.ndarray:
    """Squared L2 distance between the normalised embeddings of each pair."""
    emb = l2_normalize(emb)
    left = np.asarray(left, dtype=np.int64)
    right = np.asarray(right, dtype=np.int64)
    if left.shape != right.shape:
        raise BadInputError(f"pairs: {left.size} left indices but {right.size} right indices")
    if left.size and (max(left.max(), right.max()) >= len(emb) or min(left.min(), right.min()) < 0):
        raise BadInputError(f"pairs index images outside the {len(emb)} embeddings given")
    return np.sum((emb[left] - emb[right]) ** 2, axis=1)


def fold_ids(n: int, nfolds: int) -> np.ndarray:
    """Contiguous folds without shuffle, sized like sklearn's KFold (the first n % k one larger)."""
    if nfolds < 2 or nfolds > n:
        raise BadInputError(f"cannot split {n} pairs into {nfolds} folds", hint="use 2 <= folds <= pairs")
    sizes = np.full(nfolds, n // nfolds)
    sizes[: n % nfolds] += 1
    return np.repeat(np.arange(nfolds), sizes)


def _accepted_counts(dist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of `dist` are strictly below each threshold (predicted 'same')."""
    return np.searchsorted(np.sort(dist), thresholds, side="left")


def accuracy_curve(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> np.ndarray:
    """Accuracy at every threshold (prediction: dist < threshold)."""
    pos, neg = dist[issame], dist[~issame]
    true_accepts = _accepted_counts(pos, thresholds)
    true_rejects = len(neg) - _accepted_counts(neg, thresholds)
    return (true_accepts + true_rejects) / max(len(dist), 1)


def rates_curve(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray = THRESHOLDS):
    """(TPR, FPR) at every threshold; a rate over zero pairs is 0."""
    pos, neg = dist[issame], dist[~issame]
    tpr = _accepted_counts(pos, thresholds) / max(len(pos), 1)
    fpr = _accepted_counts(neg, thresholds) / max(len(neg), 1)
    return tpr, fpr


def kfold_accuracy(dist: np.ndarray, issame: np.ndarray, folds: np.ndarray,
                   thresholds: np.ndarray = THRESHOLDS) -> dict[str, Any]:
    """Cross-validated accuracy; `folds` gives each pair's fold id. Also the per-pair correctness
    under its own fold's threshold (what a paired comparison of two models needs)."""
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    folds = np.asarray(folds)
    fold_values = np.unique(folds)
    if len(fold_values) < 2:
        raise BadInputError("cross-validation needs pairs from at least 2 folds")
    fold_acc, fold_thr = [], []
    correct = np.zeros(len(dist), dtype=bool)
    for fold in fold_values:
        test = folds == fold
        train = ~test
        best = thresholds[int(np.argmax(accuracy_curve(dist[train], issame[train], thresholds)))]
        predicted = dist[test] < best
        correct[test] = predicted == issame[test]
        fold_acc.append(float(np.mean(correct[test])))
        fold_thr.append(float(best))
    return {"fold_accuracy": fold_acc, "fold_threshold": fold_thr, "correct": correct}


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far_targets: Sequence[float] = FAR_TARGETS,
               *, higher_is_same: bool = False) -> tuple[dict[str, dict[str, float]], list[str]]:
    """True-accept rate at each false-accept rate over all pairs (no folds).

    For a target FAR f with n impostors, k = floor(f * n) impostors may be accepted: the
    threshold is the (k+1)-th most similar impostor score and a pair is accepted when it is
    strictly more similar than that (ties rejected, so the achieved FAR never exceeds f).
    A target needs at least 1/f impostor pairs, otherwise it is skipped and listed.
    """
    genuine = np.asarray(genuine, dtype=np.float64)
    impostor = np.asarray(impostor, dtype=np.float64)
    if higher_is_same:  # work with "distance-like" scores: smaller means more similar
        genuine, impostor = -genuine, -impostor
    ordered = np.sort(impostor)
    results: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    for far in far_targets:
        key = f"{far:.0e}"
        if len(ordered) < round(1.0 / far) or len(genuine) == 0:
            skipped.append(key)
            continue
        allowed = int(np.floor(far * len(ordered) + 1e-9))
        threshold = ordered[allowed]
        accepted_impostors = int(np.sum(ordered < threshold))
        value = float(threshold if not higher_is_same else -threshold)
        results[key] = {"tar": float(np.mean(genuine < threshold)),
                        "far": accepted_impostors / len(ordered), "threshold": value}
    return results, skipped


def roc_points(dist: np.ndarray, issame: np.ndarray, max_points: int = 400) -> dict[str, list[float]]:
    """Pooled ROC over every distinct distance (thinned to about `max_points`), for plots."""
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    candidates = np.unique(dist)
    if len(candidates) > max_points:
        candidates = np.quantile(candidates, np.linspace(0.0, 1.0, max_points))
    thresholds = np.concatenate([[-np.inf], np.nextafter(candidates, np.inf)])
    tpr, fpr = rates_curve(dist, issame, thresholds)
    finite = np.where(np.isfinite(thresholds), thresholds, 0.0)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "threshold": finite.tolist()}


def evaluate_distances(dist: np.ndarray, issame: np.ndarray, *, folds: np.ndarray | None = None,
                       nfolds: int = 10, details: bool = False) -> dict[str, Any]:
    """The full protocol on precomputed squared distances."""
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if dist.shape != issame.shape or dist.ndim != 1:
        raise BadInputError(f"{dist.size} distances but {issame.size} labels")
    if not issame.any() or issame.all():
        raise BadInputError("verification pairs need both same and different pairs",
                            hint="check the pairs file or build balanced pairs with pairs:N@DATA")
    fold_of_pair = np.asarray(folds) if folds is not None else fold_ids(len(dist), nfolds)
    cv = kfold_accuracy(dist, issame, fold_of_pair)
    tar, skipped = tar_at_far(dist[issame], dist[~issame])
    overall = accuracy_curve(dist, issame)
    result: dict[str, Any] = {
        "accuracy": float(np.mean(cv["fold_accuracy"])),
        "accuracy_std": float(np.std(cv["fold_accuracy"])),
        "threshold": float(np.mean(cv["fold_threshold"])),
        "folds": len(cv["fold_accuracy"]),
        "folds_from": "pairs" if folds is not None else "contiguous",
        "fold_accuracy": cv["fold_accuracy"],
        "fold_threshold": cv["fold_threshold"],
        "best_threshold_all_pairs": float(THRESHOLDS[int(np.argmax(overall))]),
        "tar_at_far": {k: v["tar"] for k, v in tar.items()},
        "tar_at_far_detail": tar,
        "far_skipped": skipped,
        "pairs": int(len(dist)),
        "positives": int(issame.sum()),
        "negatives": int((~issame).sum()),
        "mean_distance_same": float(dist[issame].mean()),
        "mean_distance_different": float(dist[~issame].mean()),
    }
    if details:
        result["correct"] = cv["correct"]
        result["distances"] = dist
        result["roc"] = roc_points(dist, issame)
    return result


def evaluate_pairs(emb: np.ndarray, pairs: Any, nfolds: int = 10, *, details: bool = False) -> dict[str, Any]:
    """Verification accuracy of `emb` (one row per image of `pairs.images`) on `pairs`
    (`left`, `right`, `issame`, optional `folds`). The pairs' own folds take precedence over
    `nfolds` contiguous folds. `details=True` adds per-pair arrays (`correct`, `distances`) and
    ROC points; without it every value is JSON-ready."""
    dist = pair_distances(emb, pairs.left, pairs.right)
    folds = getattr(pairs, "folds", None)
    if folds is not None and len(np.unique(np.asarray(folds))) < 2:
        folds = None
    return evaluate_distances(dist, np.asarray(pairs.issame, dtype=bool), folds=folds, nfolds=nfolds,
                              details=details)
