"""Paired bootstrap over pairs: is model B's accuracy different from model A's on the same pairs?

Both models are scored on identical pairs, so resampling pair indices (with replacement) and
recomputing mean(B) - mean(A) on each resample keeps the pairing and gives a percentile CI of the
accuracy difference that accounts for which pairs happen to be in the test set.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shrinkcli.errors import BadInputError


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, *, resamples: int = 2000,
                     seed: int = 0, confidence: float = 0.95, chunk: int = 256) -> dict[str, Any]:
    """`correct_*`: per-pair correctness in [0, 1] (bool, or a seed-group mean)."""
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise BadInputError(f"paired bootstrap needs two equal-length per-pair arrays, got {a.shape} and {b.shape}")
    if resamples < 1:
        raise BadInputError(f"--bootstrap must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    delta = b - a
    diffs = np.empty(resamples)
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        index = rng.integers(0, len(delta), size=(count, len(delta)))
        diffs[start:start + count] = delta[index].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    # two-sided bootstrap p-value: how often the resampled difference falls on the other side of 0
    p_value = min(1.0, 2.0 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    return {"difference": float(delta.mean()), "ci_low": float(low), "ci_high": float(high),
            "confidence": confidence, "resamples": resamples, "seed": seed,
            "p_value": float(p_value), "excludes_zero": bool(low > 0 or high < 0)}
