"""Side-by-side rate measurement and the result rows every suite returns.

A benchmark here never reports a lone absolute timing as its verdict: it measures two (or more)
workloads in the same run, interleaved, so that a machine that gets busier or quieter halfway
through affects both sides alike. Each workload is a callable returning how many items (images)
it processed; rates are items per second, and the median over the repeats is reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

Workload = Callable[[], int]


def interleaved_rates(workloads: dict[str, Workload], *, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median items/s of each workload, run round-robin after `warmup` untimed rounds.

    The order rotates every round (A B C, B C A, ...) so no workload always runs right after the
    same neighbour (caches, thermal state and background load then bias none of them).
    """
    names = list(workloads)
    for _ in range(max(0, warmup)):
        for name in names:
            workloads[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(max(1, repeats)):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            items = workloads[name]()
            samples[name].append(items / max(time.perf_counter() - started, 1e-9))
    return {name: statistics.median(values) for name, values in samples.items()}


def ratio_row(suite: str, measure: str, *, a: str, a_value: float, b: str, b_value: float, unit: str,
              ratio: float, target: float | None, higher_is_better: bool = True, settings: str = "") -> dict[str, Any]:
    """One result row: A and B side by side, their ratio and whether it meets the target."""
    passed = None
    if target is not None:
        passed = ratio >= target if higher_is_better else ratio <= target
    target_text = "" if target is None else f"{'>=' if higher_is_better else '<='} {target:g}"
    return {"suite": suite, "measure": measure, "a": a, "a_value": _round(a_value), "b": b,
            "b_value": _round(b_value), "unit": unit, "ratio": _round(ratio), "target": target_text,
            "pass": "info" if passed is None else ("pass" if passed else "FAIL"), "settings": settings}


def info_row(suite: str, measure: str, *, a: str, a_value: float | None, unit: str, settings: str = "",
             b: str = "", b_value: float | None = None) -> dict[str, Any]:
    """A measured value without a target (e.g. peak memory of a stage)."""
    return {"suite": suite, "measure": measure, "a": a, "a_value": _round(a_value), "b": b,
            "b_value": _round(b_value), "unit": unit, "ratio": None, "target": "", "pass": "info",
            "settings": settings}


ROW_FIELDS = ("suite", "measure", "a", "a_value", "b", "b_value", "unit", "ratio", "target", "pass", "settings")


def _round(value: float | None) -> float | None:
    if value is None:
        return None
    magnitude = abs(value)
    digits = 4 if magnitude < 10 else (1 if magnitude < 1000 else 0)
    return round(float(value), digits)
