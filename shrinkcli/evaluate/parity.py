"""Agreement between two embedding sets for the same inputs (e.g. ONNX vs the torch weights).

The one parity implementation: `shrink export`'s self-check (every runtime) and `shrink verify`
compare with `parity` and gate with `gate`, on the same thresholds and with the same result keys.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shrinkcli.errors import BadInputError
from shrinkcli.evaluate.verification import l2_normalize


# Minimum per-image cosine against fp32 torch, per weight precision. fp32 differs only in the order
# of floating-point operations (measured 1.000000 in every runtime); fp16 keeps about three
# decimal digits; int8 rounds weights and activations by design.
MIN_COSINE = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.98}


def looks_normalized(x: np.ndarray, tolerance: float = 1e-3) -> bool:
    return bool(np.all(np.abs(np.linalg.norm(x, axis=1) - 1.0) < tolerance))


def parity(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Max abs element difference and mean/min cosine between rows of `a` and `b`.

    When exactly one side is already L2-normalised (an export with normalisation in the graph)
    both are normalised before the abs difference, so that it compares like with like.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise BadInputError(f"parity: output shapes differ ({a.shape} vs {b.shape})",
                            hint="compare an artifact with the weights it was exported from")
    normalized = looks_normalized(a) != looks_normalized(b)
    diff_a, diff_b = (l2_normalize(a), l2_normalize(b)) if normalized else (a, b)
    cosine = np.sum(l2_normalize(a) * l2_normalize(b), axis=1)
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    return {
        "max_abs_diff": float(np.max(np.abs(diff_a - diff_b))) if finite else float("inf"),
        "mean_abs_diff": float(np.mean(np.abs(diff_a - diff_b))) if finite else float("inf"),
        "mean_cosine": float(np.mean(cosine)) if finite else float("nan"),
        "min_cosine": float(np.min(cosine)) if finite else float("nan"),
        "compared_normalized": normalized,
        "samples": int(len(a)),
        "finite": finite,
    }


def gate(reference: np.ndarray, candidate: np.ndarray, variant: str, min_cosine: float | None = None) -> dict[str, Any]:
    """`parity` plus the gate: `passed` when every value is finite and the minimum cosine reaches
    `min_cosine` (default: MIN_COSINE of the variant's precision)."""
    result = parity(reference, candidate)
    threshold = MIN_COSINE[variant] if min_cosine is None else float(min_cosine)
    result["min_cosine_required"] = threshold
    result["passed"] = bool(result["finite"] and result["min_cosine"] >= threshold)
    return result
