"""`shrink compare`: is model (group) B more accurate than model (group) A on the same pairs?

Each model is scored with its own cross-validated thresholds (the verify protocol), giving a
0/1 correctness per pair. A group of seeds is summarised per pair by the mean correctness over
its members, so the group accuracy is exactly the mean of the members' accuracies. The
difference B - A gets a paired bootstrap CI (seeded) over pairs and, for groups, over seeds too
(see shrinkcli.evaluate.bootstrap), so it covers training noise as well. "only A right" counts the pairs
where A's (mean) correctness is higher than B's: for single models, A right and B wrong.
"""

from __future__ import annotations

from typing import Any

from shrinkcli import log
from shrinkcli.errors import BadInputError, GateFailedError


def _score_group(runners: list, sources: list[str], group: str, pairs_for, crop, input_size, flip: bool = True):
    import numpy as np

    from shrinkcli.evaluate.verification import evaluate_pairs

    rows, correctness = [], []
    for source, runner in zip(sources, runners):
        if input_size is not None and input_size != runner.input_size:
            raise BadInputError(f"{source} takes {runner.input_size}px images, not --input-size {input_size}")
        pairs = pairs_for(runner.input_size, crop if crop is not None else runner.crop)
        result = evaluate_pairs(runner.embed(pairs.images, flip=flip), pairs, details=True)
        correctness.append(result["correct"].astype(np.float64))
        rows.append({"group": group, "model": source, "accuracy": result["accuracy"],
                     "accuracy_std": result["accuracy_std"], "folds": result["folds"]})
        log.info(f"{group}: {source}: accuracy {100 * result['accuracy']:.2f} +- {100 * result['accuracy_std']:.2f}")
    lengths = {len(c) for c in correctness}
    if len(lengths) != 1:
        raise BadInputError("models were scored on different numbers of pairs")
    return rows, np.stack(correctness)


def run(*, model_a: list[str], model_b: list[str], pairs: str, data: str | None = None,
        min_gain: float | None = None, bootstrap: int = 2000, seed: int = 0, crop: int | None = None,
        input_size: int | None = None) -> dict[str, Any]:
    import numpy as np

    from shrinkcli.data import load_pairs
    from shrinkcli.evaluate.bootstrap import paired_bootstrap
    from shrinkcli.evaluate.runners import open_runner

    if not model_a or not model_b:
        raise BadInputError("compare needs at least one --a and one --b model")
    if bootstrap < 1:
        raise BadInputError(f"--bootstrap must be >= 1, got {bootstrap}")
    loaded: dict[tuple, Any] = {}

    def pairs_for(size: int, image_crop):
        key = (size, image_crop)
        if key not in loaded:
            loaded[key] = load_pairs(pairs, data_root=data, input_size=size, crop=image_crop)
        return loaded[key]

    # open every model first: a missing or unreadable file fails before any slow embedding
    runners_a = [open_runner(source, "model A") for source in model_a]
    runners_b = [open_runner(source, "model B") for source in model_b]
    rows_a, members_a = _score_group(runners_a, list(model_a), "A", pairs_for, crop, input_size)
    rows_b, members_b = _score_group(runners_b, list(model_b), "B", pairs_for, crop, input_size)
    if members_a.shape[1] != members_b.shape[1]:
        raise BadInputError("groups A and B were scored on different pairs")
    stats = paired_bootstrap(members_a, members_b, resamples=bootstrap, seed=seed)
    correct_a, correct_b = members_a.mean(axis=0), members_b.mean(axis=0)
    summary = {
        "pairs": int(len(correct_a)), "accuracy_a": float(correct_a.mean()), "accuracy_b": float(correct_b.mean()),
        "difference_b_minus_a": stats["difference"], "ci95_low": stats["ci_low"], "ci95_high": stats["ci_high"],
        "bootstrap_p_value": stats["p_value"], "excludes_zero": stats["excludes_zero"],
        "ci_resamples": stats["resampled"],
        "only_a_right": int(np.sum(correct_a > correct_b)), "only_b_right": int(np.sum(correct_b > correct_a)),
        "models_a": len(rows_a), "models_b": len(rows_b), "resamples": bootstrap, "seed": seed,
    }
    if len(rows_a) > 1 or len(rows_b) > 1:
        for name, rows in (("a", rows_a), ("b", rows_b)):
            summary[f"seed_sd_{name}"] = float(np.std([r["accuracy"] for r in rows], ddof=1)) if len(rows) > 1 else 0.0
    result = {"summary": summary, "tables": {"models": rows_a + rows_b}}
    if min_gain is not None:
        summary["min_gain"] = min_gain
        summary["gate"] = "pass" if stats["difference"] >= min_gain else "FAIL"
        if stats["difference"] < min_gain:
            raise GateFailedError(
                f"compare gate failed: B - A = {100 * stats['difference']:.2f} pt < --min-gain {100 * min_gain:.2f} pt "
                f"(95% CI {100 * stats['ci_low']:.2f} .. {100 * stats['ci_high']:.2f})", result=result)
    return result
