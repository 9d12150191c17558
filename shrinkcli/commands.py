"""Stage commands of the `shrink` CLI. Each parses options into a config and calls one stage.

The options of teacher, distill, export, verify and embed are generated from their config
dataclasses (shrinkcli.options): a new config field is a new option, with its help and default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from shrinkcli.app import (CONFIG, EXIST_OK, NAME, PROJECT, RUN_DIR, SET, _build_config, _run, app, call_stage,
                           data_app)
from shrinkcli.config import STAGE_CONFIGS
from shrinkcli.options import parameter, stage_command
from shrinkcli.rundir import RunOptions, check_name

RESUME = typer.Option(None, "--resume", help="Resume from a run dir or a weights/last.pt checkpoint.")
RUN_DIR_PARAMS = [
    parameter("project", str, PROJECT), parameter("name", Optional[str], NAME),
    parameter("run_dir", Optional[Path], RUN_DIR), parameter("exist_ok", bool, EXIST_OK),
]
RECIPE_PARAMS = [parameter("config", Optional[Path], CONFIG), parameter("overrides", Optional[List[str]], SET)]


def _stage_handler(stage: str):
    def handle(values: dict[str, Any], extra: dict[str, Any]) -> None:
        from shrinkcli.stages.registry import STAGES

        options = RunOptions(project=extra.get("project", "runs"), name=extra.get("name"),
                             run_dir=str(extra["run_dir"]) if extra.get("run_dir") else None,
                             exist_ok=bool(extra.get("exist_ok", False)), resume=extra.get("resume"))

        def build():
            if options.name is not None:
                check_name(options.name)        # refused before any work, like every other option
            return _build_config(stage, extra.get("config"), values, extra.get("overrides"))

        call_stage(STAGES[stage], options, config=build)
    return handle


stage_command(app, "teacher", STAGE_CONFIGS["teacher"], _stage_handler("teacher"),
              doc="Train a teacher with a margin loss (ArcFace/CosFace), or import one with --load.",
              extra=[parameter("resume", Optional[str], RESUME), *RECIPE_PARAMS, *RUN_DIR_PARAMS])
stage_command(app, "distill", STAGE_CONFIGS["distill"], _stage_handler("distill"),
              doc="Train a student by multi-stage angular distillation from a frozen teacher.",
              extra=[parameter("resume", Optional[str], RESUME), *RECIPE_PARAMS, *RUN_DIR_PARAMS])
stage_command(app, "export", STAGE_CONFIGS["export"], _stage_handler("export"),
              doc="Write deployable artifacts (ONNX fp32/fp16/int8, safetensors) with metadata and a parity check.",
              extra=[*RECIPE_PARAMS, *RUN_DIR_PARAMS])
stage_command(app, "verify", STAGE_CONFIGS["verify"], _stage_handler("verify"),
              doc="Check parity and face-verification accuracy; exit 1 when a gate fails.",
              extra=[*RECIPE_PARAMS, *RUN_DIR_PARAMS])
stage_command(app, "embed", STAGE_CONFIGS["embed"], _stage_handler("embed"),
              doc="Embed a data set once into a resumable feature store (read by verify for probes and distractors).",
              positional=[parameter("model", str, typer.Argument(..., help=STAGE_CONFIGS["embed"].__dataclass_fields__["model"].metadata["help"]))],
              extra=RECIPE_PARAMS)


@app.command()
def pipeline(
    recipe: Optional[Path] = typer.Argument(None, help="TOML recipe (default: the built-in quickstart on synthetic data)."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key: --set distill.epochs=3 (or common.KEY=...)."),
    project: str = PROJECT, name: Optional[str] = NAME, run_dir: Optional[Path] = RUN_DIR, exist_ok: bool = EXIST_OK,
    force: bool = typer.Option(False, "--force", help="Re-run stages even when their outputs are up to date."),
) -> None:
    """Run teacher -> distill -> export -> verify from one recipe in one parent run dir."""
    from shrinkcli.stages import pipeline as pipeline_stage

    options = RunOptions(project=project, name=name, run_dir=str(run_dir) if run_dir else None, exist_ok=exist_ok)
    call_stage(pipeline_stage.run, recipe, overrides or [], options, force=force)


@app.command()
def compare(
    model_a: List[str] = typer.Option(..., "--a", help="Model A (repeat for a group of seeds)."),
    model_b: List[str] = typer.Option(..., "--b", help="Model B (repeat for a group of seeds)."),
    pairs: str = typer.Option(..., "--pairs", help="Verification pairs (as for verify)."),
    data: Optional[str] = typer.Option(None, "--data", help="Image root when --pairs is a pairs.txt."),
    min_gain: Optional[float] = typer.Option(None, "--min-gain", help="Gate: B minus A accuracy must be at least this (0..1)."),
    bootstrap: int = typer.Option(2000, "--bootstrap", help="Paired bootstrap resamples."),
    seed: int = typer.Option(0, "--seed"),
    crop: Optional[int] = typer.Option(None, "--crop"),
    input_size: Optional[int] = typer.Option(None, "--input-size"),
) -> None:
    """Paired comparison of two models (or seed groups) on the same pairs, with a bootstrap CI."""
    from shrinkcli.stages import compare as compare_stage

    call_stage(compare_stage.run, model_a=model_a, model_b=model_b, pairs=pairs, data=data, min_gain=min_gain,
                bootstrap=bootstrap, seed=seed, crop=crop, input_size=input_size)


@app.command()
def models(
    input_size: int = typer.Option(112, "--input-size", help="Input side used to compute MACs and stage shapes."),
    filter: Optional[str] = typer.Option(None, "--filter", help="Only names containing this."),
) -> None:
    """List registered architectures with params, MACs and stage shapes (all computed)."""

    def work():
        from shrinkcli.models.summary import registry_table

        rows = registry_table(input_size=input_size, name_filter=filter)
        return {"tables": {f"models at {input_size}x{input_size}": rows}, "summary": {"models": len(rows)}}

    _run(work)


@data_app.command("inspect")
def data_inspect(
    data: str = typer.Argument(..., help="A data spec: folder:PATH, rec:PATH, hf:PATH, a .bin pack, or a path."),
    check_images: bool = typer.Option(True, "--check-images/--no-check-images", help="Decode every image to find corrupt files."),
) -> None:
    """Count identities, images, per-identity histogram, image sizes and corrupt files."""
    from shrinkcli.stages import data_tools

    call_stage(data_tools.run, "inspect", data=data, check_images=check_images)


@data_app.command("pack")
def data_pack(
    data: str = typer.Argument(..., help="Source: a labelled folder or HF dataset spec."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder for train.rec/train.idx/property."),
    bin_pairs: Optional[int] = typer.Option(None, "--bin-pairs", help="Also write a .bin verification pack with this many pairs."),
    quality: int = typer.Option(95, "--quality", help="JPEG quality (use --format png for lossless)."),
    image_format: str = typer.Option("jpg", "--format", help="jpg or png inside the records."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write an insightface-compatible train.rec/train.idx/property (and optionally a .bin pack)."""
    from shrinkcli.stages import data_tools

    call_stage(data_tools.run, "pack", data=data, output=str(output), bin_pairs=bin_pairs, quality=quality,
                image_format=image_format, seed=seed)


@app.command()
def bench(
    suite: str = typer.Argument("all", help="all, or one of: distill, data, onnx, int8, deploy, cache, memory, scale."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write the results as Markdown here."),
    quick: bool = typer.Option(False, "--quick", help="Smaller sizes (for a smoke run)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="deploy suite: the student to export and time."),
) -> None:
    """Measure speed ratios side by side in one run (see docs/benchmarks.md)."""
    from shrinkcli.stages import bench as bench_stage

    call_stage(bench_stage.run, suite=suite, output=str(output) if output else None, quick=quick,
               weights=str(weights) if weights else None)
