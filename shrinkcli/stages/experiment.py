"""Seeded variant studies: one teacher, several distillation variants x seeds, paired statistics.

Run by `shrink pipeline RECIPE` when the recipe has an `[experiment]` table:

    [experiment]
    seeds = [0, 1, 2]
    baseline = "baseline"            # the variant every other one is compared with
    pairs = "lfw-half:../shared/data/lfw"
    only = ["baseline", "embed"]     # optional: train and report just these variants
    [experiment.variants.baseline]   # keys override [distill] for this variant
    embed_loss = "none"
    stage_loss = "none"

Runs go seed by seed (every variant at the first seed, then the next seed), so a study stopped
early already compares every variant. Every run lives in `<parent>/teacher` and
`<parent>/distill-<variant>-s<seed>`, is skipped when up to date and resumed when interrupted, so the study can be stopped and restarted at any time. Each
model is scored on the same pairs with its own cross-validated thresholds; a variant's gain over
the baseline gets two 95% paired-bootstrap CIs: over pairs (seed-group mean correctness per pair),
which says how sure the difference is on this test set, and over pairs and seeds, which also
covers training noise. Every two non-baseline variants are compared the second way, and the
difference is called "within noise" when that CI includes zero.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from shrinkcli import log
from shrinkcli.atomic import atomic_write_json, atomic_write_text
from shrinkcli.errors import BadInputError
from shrinkcli.rundir import RunDir, RunOptions, check_name, load_manifest
from shrinkcli.stages.registry import STAGES
from shrinkcli.stages.staleness import prepare_stage


def _plan(recipe: dict[str, Any]) -> tuple[list[int], str, str, dict[str, dict[str, Any]]]:
    """The study's seeds, baseline, pairs and variants, every one checked before anything trains:
    a mistake found after the teacher would cost its whole training time."""
    from shrinkcli.config import stage_config_from_recipe

    spec = recipe["experiment"]
    unknown = sorted(set(spec) - {"seeds", "baseline", "pairs", "variants", "bootstrap", "only"})
    if unknown:
        raise BadInputError(f"recipe [experiment]: unknown key(s) {', '.join(unknown)}",
                            hint="valid keys: seeds, baseline, pairs, variants, bootstrap, only")
    variants = spec.get("variants") or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise BadInputError("recipe [experiment]: variants must be tables ([experiment.variants.NAME])")
    for name in variants:
        check_name(name, "recipe [experiment]: variant name")
    baseline = spec.get("baseline", "baseline")
    if not isinstance(baseline, str) or baseline not in variants:
        raise BadInputError(f"recipe [experiment]: baseline variant {baseline!r} is not in [experiment.variants]")
    only = spec.get("only")
    if only is not None:
        if not isinstance(only, list) or not only or not all(isinstance(n, str) for n in only):
            raise BadInputError(f"recipe [experiment]: only must be a non-empty list of variant names, got {only!r}")
        missing = [n for n in only if n not in variants]
        if missing:
            raise BadInputError(f"recipe [experiment]: only names unknown variant(s) {', '.join(missing)}",
                                hint=f"variants: {', '.join(variants)}")
        if baseline not in only:
            raise BadInputError(f"recipe [experiment]: only leaves out the baseline {baseline!r}",
                                hint="every gain is measured against the baseline; add it to the list")
        variants = {name: changes for name, changes in variants.items() if name in only}
    if not spec.get("pairs") or not isinstance(spec["pairs"], str):
        raise BadInputError("recipe [experiment]: no pairs to evaluate on", hint='e.g. pairs = "lfw-half:ROOT"')
    seeds = spec.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds)):
        raise BadInputError(f"recipe [experiment]: seeds must be a non-empty list of integers 0..2^32-1, got {seeds!r}",
                            hint="e.g. seeds = [0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise BadInputError(f"recipe [experiment]: seeds {seeds} repeat a seed",
                            hint="each seed trains one run; a repeated one would be counted twice")
    bootstrap = spec.get("bootstrap", 2000)
    if not isinstance(bootstrap, int) or isinstance(bootstrap, bool) or not 1 <= bootstrap <= 10**6:
        raise BadInputError(f"recipe [experiment]: bootstrap must be an integer 1..1000000, got {bootstrap!r}")
    stage_config_from_recipe(recipe, "teacher")
    for name, changes in variants.items():     # unknown keys and bad values of every variant
        stage_config_from_recipe({**recipe, "distill": {**recipe.get("distill", {}), **changes}}, "distill",
                                 f"variant {name}")
    return seeds, baseline, str(spec["pairs"]), variants


def _train(stage: str, config: Any, run_dir: Path, options: RunOptions) -> tuple[str, float]:
    state, resume = prepare_stage(run_dir, config)
    if state == "done":
        return "skipped (up to date)", float(load_manifest(run_dir).get("results", {}).get("wall_s") or 0.0)
    log.info(f"[{run_dir.name}] {'resuming' if resume else 'running'}")
    started = time.perf_counter()
    STAGES[stage](config, RunOptions(project=options.project, run_dir=str(run_dir), exist_ok=True, resume=resume))
    return ("resumed" if resume else "ran"), round(time.perf_counter() - started, 1)


def _score(run_dir: Path, pairs_spec: str, cache: dict[str, Any]) -> dict[str, Any]:
    """Accuracy and per-pair correctness of a run's model, memoised by the model's sha256."""
    import numpy as np

    from shrinkcli.data import load_pairs
    from shrinkcli.evaluate.runners import open_runner
    from shrinkcli.evaluate.verification import evaluate_pairs

    runner = open_runner(str(run_dir))
    key = f"{runner.sha256}:{pairs_spec}"
    if key not in cache:
        pairs = load_pairs(pairs_spec, input_size=runner.input_size, crop=runner.crop)
        result = evaluate_pairs(runner.embed(pairs.images), pairs, details=True)
        cache[key] = {"accuracy": result["accuracy"], "accuracy_std": result["accuracy_std"],
                      "correct": np.asarray(result["correct"], dtype=np.uint8).tolist()}
    return cache[key]


def run(recipe: dict[str, Any], parent: Path, options: RunOptions) -> dict[str, Any]:
    import numpy as np

    from shrinkcli.config import stage_config_from_recipe
    from shrinkcli.evaluate.bootstrap import paired_bootstrap

    seeds, baseline, pairs_spec, variants = _plan(recipe)
    resamples = int(recipe["experiment"].get("bootstrap", 2000))
    parent_run = RunDir.create("experiment", run_dir=parent, exist_ok=True, config=recipe)
    cache_path = parent / "scores.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    teacher_dir = parent / "teacher"
    action, seconds = _train("teacher", stage_config_from_recipe(recipe, "teacher"), teacher_dir, options)
    rows = [{"run": "teacher", "action": action, "seconds": seconds}]
    teacher = _score(teacher_dir, pairs_spec, cache)
    groups: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        for name, changes in variants.items():
            table = {**recipe.get("distill", {}), **changes, "seed": seed}
            config = stage_config_from_recipe({**recipe, "distill": table}, "distill", f"variant {name}")
            config = config.replace("experiment", teacher=str(teacher_dir))
            run_dir = parent / f"distill-{name}-s{seed}"
            action, seconds = _train("distill", config, run_dir, options)
            rows.append({"run": run_dir.name, "action": action, "seconds": seconds})
            groups.setdefault(name, []).append({**_score(run_dir, pairs_spec, cache), "seconds": seconds})
            atomic_write_json(cache_path, cache)
    atomic_write_json(cache_path, cache)
    members = {name: np.stack([np.asarray(m["correct"], dtype=np.float64) for m in group])
               for name, group in groups.items()}
    base_mean = float(np.mean([m["accuracy"] for m in groups[baseline]]))
    table = [{"model": "teacher", "accuracy_mean": teacher["accuracy"], "accuracy_sd": None, "seeds": 1,
              "gain_pt": None, "ci95_pt": None, "ci95_seeds_pt": None, "gap_closed": None, "wall_s": rows[0]["seconds"]}]
    for name, group in groups.items():
        accuracies = [m["accuracy"] for m in group]
        row = {"model": name, "accuracy_mean": float(np.mean(accuracies)),
               "accuracy_sd": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else None,
               "seeds": len(group), "gain_pt": None, "ci95_pt": None, "ci95_seeds_pt": None, "gap_closed": None,
               "wall_s": float(np.mean([m["seconds"] for m in group]))}
        if name != baseline:
            over_pairs = paired_bootstrap(members[baseline].mean(axis=0), members[name].mean(axis=0),
                                          resamples=resamples, seed=0)
            over_seeds = paired_bootstrap(members[baseline], members[name], resamples=resamples, seed=0)
            row["gain_pt"] = round(100 * over_pairs["difference"], 2)
            row["ci95_pt"] = _interval(over_pairs)
            row["ci95_seeds_pt"] = _interval(over_seeds) if len(seeds) > 1 else None
            gap = teacher["accuracy"] - base_mean
            row["gap_closed"] = round((row["accuracy_mean"] - base_mean) / gap, 3) if gap > 0 else None
        table.append(row)
    contrasts = _contrasts(members, baseline, resamples)
    atomic_write_text(parent / "results.md", _markdown(table, contrasts, pairs_spec, seeds, baseline))
    parent_run.add_output(parent / "results.md", "report-md")
    parent_run.set_results(runs=rows, table=table, contrasts=contrasts)
    parent_run.finish()
    return {"run_dir": str(parent), "tables": {"runs": rows, f"accuracy on {pairs_spec}": table,
                                               "variant vs variant": contrasts},
            "summary": {"run_dir": str(parent), "results": str(parent / "results.md")}}


def _interval(stats: dict[str, Any]) -> str:
    return f"{100 * stats['ci_low']:.2f} .. {100 * stats['ci_high']:.2f}"


def _contrasts(members: dict[str, Any], baseline: str, resamples: int) -> list[dict[str, Any]]:
    """Every pair of non-baseline variants: B - A with the CI over pairs and seeds, and a plain verdict."""
    from shrinkcli.evaluate.bootstrap import paired_bootstrap

    names = [n for n in members if n != baseline]
    rows = []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            stats = paired_bootstrap(members[first], members[second], resamples=resamples, seed=0)
            rows.append({"a": first, "b": second, "difference_pt": round(100 * stats["difference"], 2),
                         "ci95_pt": _interval(stats), "resampled": stats["resampled"],
                         "verdict": ("b better" if stats["ci_low"] > 0 else "a better") if stats["excludes_zero"]
                         else "within noise"})
    return rows


def _markdown(table: list[dict[str, Any]], contrasts: list[dict[str, Any]], pairs_spec: str, seeds: list[int],
              baseline: str) -> str:
    lines = [f"Pairs: `{pairs_spec}`; seeds {seeds}; gains are over `{baseline}` with 95% paired-bootstrap CIs: "
             "over pairs (seed-mean correctness per pair), and over pairs and seeds (covers training noise).",
             "", "| model | accuracy (mean +- sd) | seeds | gain (pt) | 95% CI, pairs (pt) | 95% CI, pairs + seeds (pt) "
             "| gap closed | wall s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        gain = "" if r["gain_pt"] is None else f"{r['gain_pt']:+.2f}"
        closed = "" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%"
        spread = f" +- {100 * r['accuracy_sd']:.2f}" if r["seeds"] > 1 else ""  # one seed has no sd
        lines.append(f"| {r['model']} | {100 * r['accuracy_mean']:.2f}{spread} | {r['seeds']} "
                     f"| {gain} | {r['ci95_pt'] or ''} | {r.get('ci95_seeds_pt') or ''} | {closed} | {r['wall_s']:.0f} |")
    if contrasts:
        lines += ["", "Variant against variant (B - A, 95% CI over pairs and seeds):", "",
                  "| A | B | B - A (pt) | 95% CI (pt) | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {c['a']} | {c['b']} | {c['difference_pt']:+.2f} | {c['ci95_pt']} | {c['verdict']} |"
                  for c in contrasts]
    return "\n".join(lines) + "\n"
