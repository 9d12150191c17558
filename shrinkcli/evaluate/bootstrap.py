"""Paired bootstrap over pairs (and seeds): is model B's accuracy different from model A's on the same pairs?

Both models are scored on identical pairs, so resampling pair indices (with replacement) and
recomputing mean(B) - mean(A) on each resample keeps the pairing and gives a percentile CI of the
accuracy difference that accounts for which pairs happen to be in the test set.

Groups of seeds ([seeds, pairs] arrays) are resampled on two levels: every resample draws the
pairs (shared by A and B, so the pairing holds) and, independently for A and B, which seeds
(with replacement) stand for the group. The CI then also covers training noise: two variants
whose seeds scatter as much as their means differ get a CI that includes zero. With few seeds the
seed level is coarse (three seeds resampled give a slightly narrow spread), so read the seed sd
beside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shrinkcli.errors import BadInputError


def _as_groups(correct: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(correct, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise BadInputError(f"paired bootstrap: {name} must be per-pair correctness, [pairs] or [seeds, pairs], "
                            f"got shape {np.shape(correct)}")
    return array


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, *, resamples: int = 2000,
                     seed: int = 0, confidence: float = 0.95, chunk: int = 64) -> dict[str, Any]:
    """`correct_*`: per-pair correctness in [0, 1], one row per seed ([pairs] for a single model)."""
    a, b = _as_groups(correct_a, "A"), _as_groups(correct_b, "B")
    if a.shape[1] != b.shape[1]:
        raise BadInputError(f"paired bootstrap needs both sides scored on the same pairs, got {a.shape[1]} "
                            f"and {b.shape[1]} pairs")
    if resamples < 1:
        raise BadInputError(f"--bootstrap must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    pairs = a.shape[1]
    seeds_resampled = a.shape[0] > 1 or b.shape[0] > 1
    if not seeds_resampled:
        delta = b[0] - a[0]
    diffs = np.empty(resamples)
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        index = rng.integers(0, pairs, size=(count, pairs))
        if not seeds_resampled:
            diffs[start:start + count] = delta[index].mean(axis=1)
            continue
        rows_a = rng.integers(0, a.shape[0], size=(count, a.shape[0]))
        rows_b = rng.integers(0, b.shape[0], size=(count, b.shape[0]))
        for k in range(count):
            mean_a = a[rows_a[k]][:, index[k]].mean()
            mean_b = b[rows_b[k]][:, index[k]].mean()
            diffs[start + k] = mean_b - mean_a
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    # two-sided bootstrap p-value: how often the resampled difference falls on the other side of 0
    p_value = min(1.0, 2.0 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    return {"difference": float(b.mean() - a.mean()), "ci_low": float(low), "ci_high": float(high),
            "confidence": confidence, "resamples": resamples, "seed": seed,
            "resampled": "pairs and seeds" if seeds_resampled else "pairs",
            "p_value": float(p_value), "excludes_zero": bool(low > 0 or high < 0)}
