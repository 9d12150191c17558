"""`shrink pipeline RECIPE`: teacher -> distill -> export -> verify in one parent run dir.

Each stage writes `<parent>/<stage>`. A stage is skipped when its manifest says it completed with the
same config and every input and output file still has the sha256 it recorded (so re-running is
cheap and a changed teacher re-triggers everything after it). An interrupted training stage with
the same config is resumed from its `weights/last.pt`. The first failed gate stops the pipeline with
its exit code.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from shrinkcli import log
from shrinkcli.config import load_recipe, stage_config_from_recipe
from shrinkcli.errors import BadInputError
from shrinkcli.rundir import MANIFEST, RunDir, RunOptions, check_name, load_manifest
from shrinkcli.stages import experiment
from shrinkcli.stages.registry import STAGES
from shrinkcli.stages.staleness import prepare_stage

PIPELINE_STAGES = ("teacher", "distill", "export", "verify")
BUILTIN_RECIPE = "quickstart.toml"


def builtin_recipe_path() -> Path:
    """The quickstart recipe shipped in the repository's `recipes/` folder."""
    path = Path(__file__).resolve().parents[2] / "recipes" / BUILTIN_RECIPE
    if not path.is_file():
        raise BadInputError(f"built-in recipe {BUILTIN_RECIPE} not found next to the package",
                            hint="pass a recipe path: shrink pipeline recipes/quickstart.toml")
    return path


def apply_recipe_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`distill.epochs=3` sets one table key; `common.input_size=64` sets a shared key."""
    recipe = json.loads(json.dumps(recipe))
    for item in overrides:
        key, sep, value = item.partition("=")
        table, dot, field = key.strip().partition(".")
        if not sep or not dot or table not in (*PIPELINE_STAGES, "common", "pipeline", "experiment"):
            raise BadInputError(f"pipeline override {item!r} must look like STAGE.KEY=VALUE",
                                hint=f"STAGE is one of {', '.join((*PIPELINE_STAGES, 'common'))}")
        recipe.setdefault(table, {})[field.replace("-", "_")] = _parse_value(value.strip())
    return recipe


def _parse_value(text: str) -> Any:
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare strings need no quotes on the command line


def _stage_configs(recipe: dict[str, Any], parent: Path) -> dict[str, Any]:
    configs = {stage: stage_config_from_recipe(recipe, stage, f"recipe[{stage}]") for stage in PIPELINE_STAGES}
    teacher_dir, distill_dir, export_dir = (str(parent / s) for s in ("teacher", "distill", "export"))
    configs["distill"] = configs["distill"].replace("pipeline", source="pipeline", teacher=teacher_dir)
    configs["export"] = configs["export"].replace("pipeline", source="pipeline", run=distill_dir)
    verify = configs["verify"]
    configs["verify"] = verify.replace("pipeline", source="pipeline", model=export_dir, reference=distill_dir,
                                       teacher=verify.teacher or teacher_dir)
    return configs




def _check_parent(parent: Path, stage: str, exist_ok: bool) -> None:
    """A re-run replaces stage folders in the parent: a folder shrink did not create for this (it
    may hold the user's files) is refused unless --exist-ok. An empty folder is harmless."""
    if exist_ok or not parent.exists():
        return
    if not parent.is_dir():
        raise BadInputError(f"{parent} exists and is not a folder", hint="choose another --run-dir/--name")
    if not any(parent.iterdir()):
        return
    try:
        made_by = load_manifest(parent).get("stage")
    except BadInputError:
        made_by = None
    if made_by != stage:
        raise BadInputError(f"{parent} exists and was not created by `shrink pipeline`"
                            + (f" (it is a {made_by} run dir)" if made_by else ""),
                            hint="choose another --run-dir/--name, or pass --exist-ok to use it anyway")


def run(recipe_path: str | Path | None, overrides: list[str], options: RunOptions, *,
        force: bool = False) -> dict[str, Any]:
    recipe_path = Path(recipe_path) if recipe_path else builtin_recipe_path()
    recipe = apply_recipe_overrides(load_recipe(recipe_path), overrides)
    given = options.name or recipe.get("pipeline", {}).get("name")
    name = check_name(str(given), "pipeline name") if given is not None else recipe_path.stem
    parent = Path(options.run_dir) if options.run_dir else Path(options.project) / "pipeline" / name
    _check_parent(parent, "experiment" if "experiment" in recipe else "pipeline", options.exist_ok)
    if "experiment" in recipe:
        return experiment.run(recipe, parent, options)
    configs = _stage_configs(recipe, parent)
    # Under torchrun every rank trains; only rank 0 touches files and runs export/verify. Rank 0
    # decides each stage's state and every rank waits after each stage, so the others always load
    # the artifact rank 0 finished writing (model.safetensors), never a half-written run dir.
    from shrinkcli.engine import distributed as ddp

    rank = ddp.env_dist_info().rank
    ddp.init_distributed(configs["teacher"].device)
    parent_run = None
    if rank == 0:
        parent_run = RunDir.create("pipeline", run_dir=parent, exist_ok=True,
                                   config={"recipe": str(recipe_path), "overrides": overrides,
                                           "stages": {s: c.to_dict() for s, c in configs.items()}})
        parent_run.add_input(recipe_path, "recipe")
    rows, results = [], {}
    try:
        for stage in PIPELINE_STAGES:
            run_dir = parent / stage
            config = configs[stage]
            if stage in ("export", "verify"):
                if rank != 0:
                    continue
                state, resume = prepare_stage(run_dir, config, force=force)
            else:
                decided = prepare_stage(run_dir, config, force=force) if rank == 0 else None
                state, resume = ddp.broadcast_object(decided)
                if rank != 0 and getattr(config, "load", None):
                    ddp.barrier()       # an imported teacher is written by rank 0 alone
                    continue
            started = time.perf_counter()
            if state == "done":
                if stage in ("teacher", "distill"):
                    ddp.barrier()
                log.info(f"[{stage}] up to date, skipped ({run_dir})")
                results[stage] = load_manifest(run_dir).get("results", {})
                rows.append({"stage": stage, "action": "skipped (up to date)", "seconds": 0.0, "run_dir": str(run_dir)})
                continue
            log.info(f"[{stage}] {'resuming' if resume else 'running'} -> {run_dir}")
            stage_options = RunOptions(project=options.project, run_dir=str(run_dir), exist_ok=True, resume=resume)
            result = STAGES[stage](config, stage_options)
            if stage in ("teacher", "distill"):
                ddp.barrier()
            results[stage] = result.get("summary", {})
            rows.append({"stage": stage, "action": "resumed" if resume else "ran",
                         "seconds": round(time.perf_counter() - started, 1), "run_dir": str(run_dir)})
    except BaseException:
        if parent_run is not None:
            parent_run.set_results(stages=rows)
            parent_run.finish("failed")
        raise
    if parent_run is not None:
        for stage in PIPELINE_STAGES:
            parent_run.add_input(parent / stage / MANIFEST, f"{stage}-manifest")
        parent_run.set_results(stages=rows, **{f"{s}_summary": results.get(s, {}) for s in PIPELINE_STAGES})
        parent_run.finish()
    verify_summary = results.get("verify", {})
    return {"run_dir": str(parent), "tables": {"pipeline": rows},
            "summary": {"run_dir": str(parent), **{k: v for k, v in verify_summary.items()
                                                   if not isinstance(v, (dict, list))}}}
