"""Stage commands of the `shrink` CLI. Each parses options into a config and calls one stage."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from shrinkcli.cli import (CONFIG, EXIST_OK, NAME, PROJECT, RUN_DIR, SET, _build_config, _call_stage,
                           _run, _run_options, app, data_app)

DATA = typer.Option(None, "--data", "-d", help="Training data: folder:PATH, rec:PATH/train.rec, hf:PATH_OR_NAME, synthetic[:N], or a path (auto-detected).")
VAL = typer.Option(None, "--val", help="Validation pairs: a .bin pack, lfw:ROOT (pairs.txt), or pairs built from a labelled set.")
RESUME = typer.Option(None, "--resume", help="Resume from a run dir or a weights/last.pt checkpoint.")


@app.command()
def teacher(
    arch: Optional[str] = typer.Option(None, "--arch", help="Teacher architecture (see `shrink models`), e.g. r90, r50, r18."),
    data: Optional[str] = DATA,
    val: Optional[str] = VAL,
    load: Optional[str] = typer.Option(None, "--load", help="Import weights instead of training: insightface backbone.pth, .pt, .safetensors or a checkpoint."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    head: Optional[str] = typer.Option(None, "--head", help="Margin head: arcface (default) or cosface."),
    sample_rate: Optional[float] = typer.Option(None, "--sample-rate", help="PartialFC: fraction of class centres per step."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Input side in pixels (multiple of 16)."),
    width: Optional[float] = typer.Option(None, "--width", help="Channel width multiplier."),
    embedding_size: Optional[int] = typer.Option(None, "--embedding-size"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N."),
    resume: Optional[str] = RESUME,
    config: Optional[Path] = CONFIG,
    overrides: Optional[List[str]] = SET,
    project: str = PROJECT, name: Optional[str] = NAME, run_dir: Optional[Path] = RUN_DIR, exist_ok: bool = EXIST_OK,
) -> None:
    """Train a teacher with a margin loss (ArcFace/CosFace), or import one with --load."""
    options = dict(arch=arch, data=data, val=val, load=load, epochs=epochs, batch_size=batch_size, lr=lr,
                   head=head, sample_rate=sample_rate, input_size=input_size, width=width,
                   embedding_size=embedding_size, device=device)
    _call_stage("teacher", _run_options(project, name, run_dir, exist_ok), config=lambda: _build_config("teacher", config, options, overrides), resume=resume)


@app.command()
def distill(
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="Teacher: a teacher run dir, a checkpoint, or an insightface backbone.pth."),
    student: Optional[str] = typer.Option(None, "--student", "-s", help="Student architecture: mobilefacenet, mobilenetv1, mobilenetv2, mfnr."),
    data: Optional[str] = DATA,
    val: Optional[str] = VAL,
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    embed_loss: Optional[str] = typer.Option(None, "--embed-loss", help="angular ((1-cos)^2, paper Eq. 4), cosine, l2 or none."),
    stage_loss: Optional[str] = typer.Option(None, "--stage-loss", help="Loss on the four stage outputs: angular, cosine, l2 or none."),
    embed_weight: Optional[float] = typer.Option(None, "--embed-weight"),
    stage_weights: Optional[str] = typer.Option(None, "--stage-weights", help="Four comma-separated weights, e.g. 1,1,1,1."),
    labels: Optional[bool] = typer.Option(None, "--labels/--no-labels", help="Add the margin loss on identity labels (default) or learn from the teacher alone."),
    head: Optional[str] = typer.Option(None, "--head", help="Margin head with --labels: arcface or cosface."),
    cache_teacher: Optional[bool] = typer.Option(None, "--cache-teacher/--no-cache-teacher", help="Compute teacher outputs once and reuse them across epochs."),
    input_size: Optional[int] = typer.Option(None, "--input-size"),
    width: Optional[float] = typer.Option(None, "--width"),
    embedding_size: Optional[int] = typer.Option(None, "--embedding-size"),
    device: Optional[str] = typer.Option(None, "--device"),
    resume: Optional[str] = RESUME,
    config: Optional[Path] = CONFIG,
    overrides: Optional[List[str]] = SET,
    project: str = PROJECT, name: Optional[str] = NAME, run_dir: Optional[Path] = RUN_DIR, exist_ok: bool = EXIST_OK,
) -> None:
    """Train a student by multi-stage angular distillation from a frozen teacher."""
    options = dict(teacher=teacher, student=student, data=data, val=val, epochs=epochs, batch_size=batch_size,
                   lr=lr, embed_loss=embed_loss, stage_loss=stage_loss, embed_weight=embed_weight,
                   stage_weights=stage_weights, labels=labels, head=head, cache_teacher=cache_teacher,
                   input_size=input_size, width=width, embedding_size=embedding_size, device=device)
    _call_stage("distill", _run_options(project, name, run_dir, exist_ok), config=lambda: _build_config("distill", config, options, overrides), resume=resume)


@app.command()
def export(
    run: Optional[str] = typer.Option(None, "--run", help="A distill (or teacher) run dir to export."),
    weights: Optional[str] = typer.Option(None, "--weights", help="A weights file to export (.safetensors, .pt, .pth)."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="onnx, safetensors or all."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 or fp16 (ONNX)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: onnxruntime quantization (static with --calib-data)."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Images for int8 calibration (a data spec)."),
    include_preprocess: Optional[bool] = typer.Option(None, "--include-preprocess/--no-preprocess", help="Accept uint8 images and normalise inside the graph."),
    normalize_output: Optional[bool] = typer.Option(None, "--l2-normalize/--no-l2-normalize", help="L2-normalise the output embedding."),
    check: Optional[bool] = typer.Option(None, "--check/--no-check", help="Parity check against the fp32 torch model (fails the command when it fails)."),
    check_data: Optional[str] = typer.Option(None, "--check-data", help="Real images for the parity check (a data spec)."),
    config: Optional[Path] = CONFIG,
    overrides: Optional[List[str]] = SET,
    project: str = PROJECT, name: Optional[str] = NAME, run_dir: Optional[Path] = RUN_DIR, exist_ok: bool = EXIST_OK,
) -> None:
    """Write deployable artifacts (ONNX fp32/fp16/int8, safetensors) with metadata and a parity check."""
    options = dict(format=format, dtype=dtype, quantize=quantize, calib_data=calib_data,
                   include_preprocess=include_preprocess, normalize_output=normalize_output, check=check,
                   check_data=check_data)
    _call_stage("export", _run_options(project, name, run_dir, exist_ok), config=lambda: _build_config("export", config, options, overrides), run=run, weights=weights)


@app.command()
def verify(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Artifact to check: .onnx, .safetensors, .pt, or a run dir."),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Reference for the parity check (e.g. the torch weights the ONNX came from)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher to compare accuracy with (enables --max-gap)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Images for parity and identification (a data spec)."),
    pairs: Optional[str] = typer.Option(None, "--pairs", help="Verification pairs: .bin pack, lfw:ROOT, a pairs.txt with --data, or pairs:N to build from --data."),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Parity gate (default 0.9999 fp32, 0.999 fp16, 0.98 int8)."),
    max_abs_diff: Optional[float] = typer.Option(None, "--max-abs-diff", help="Parity gate on the largest element difference."),
    min_accuracy: Optional[float] = typer.Option(None, "--min-accuracy", help="Gate on verification accuracy (0..1)."),
    max_gap: Optional[float] = typer.Option(None, "--max-gap", help="Gate on teacher minus student accuracy (0..1)."),
    config: Optional[Path] = CONFIG,
    overrides: Optional[List[str]] = SET,
    project: str = PROJECT, name: Optional[str] = NAME, run_dir: Optional[Path] = RUN_DIR, exist_ok: bool = EXIST_OK,
) -> None:
    """Check parity and face-verification accuracy; exit 1 when a gate fails."""
    options = dict(model=model, reference=reference, teacher=teacher, data=data, pairs=pairs,
                   min_cosine=min_cosine, max_abs_diff=max_abs_diff, min_accuracy=min_accuracy, max_gap=max_gap)
    _call_stage("verify", _run_options(project, name, run_dir, exist_ok), config=lambda: _build_config("verify", config, options, overrides))


@app.command()
def embed(
    model: str = typer.Argument(..., help="Model to embed with: .onnx, .safetensors, .pt, or a run dir (as verify --model)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Labelled images to embed (a data spec), e.g. MegaFace distractors."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Store folder; an unfinished store of the same model and data is continued."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float16 (default, half the disk) or float32."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="Images per chunk, the unit of resume (default 4096)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward (default 64)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace a store made from another model, data or settings."),
    config: Optional[Path] = CONFIG,
    overrides: Optional[List[str]] = SET,
) -> None:
    """Embed a data set once into a resumable feature store (read by verify for probes and distractors)."""
    options = dict(model=model, data=data, out=str(out) if out else None, dtype=dtype, chunk_size=chunk_size,
                   batch_size=batch_size, overwrite=overwrite)
    _call_stage("embed", _run_options("runs", None, None, False), config=lambda: _build_config("embed", config, options, overrides))


@app.command()
def pipeline(
    recipe: Optional[Path] = typer.Argument(None, help="TOML recipe (default: the built-in quickstart on synthetic data)."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key: --set distill.epochs=3 (or common.KEY=...)."),
    project: str = PROJECT, name: Optional[str] = NAME, run_dir: Optional[Path] = RUN_DIR, exist_ok: bool = EXIST_OK,
    force: bool = typer.Option(False, "--force", help="Re-run stages even when their outputs are up to date."),
) -> None:
    """Run teacher -> distill -> export -> verify from one recipe in one parent run dir."""
    _call_stage("pipeline", recipe, overrides or [], _run_options(project, name, run_dir, exist_ok), force=force)


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
    _call_stage("compare", model_a=model_a, model_b=model_b, pairs=pairs, data=data, min_gain=min_gain,
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
    _call_stage("data_tools", "inspect", data=data, check_images=check_images)


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
    _call_stage("data_tools", "pack", data=data, output=str(output), bin_pairs=bin_pairs, quality=quality,
                image_format=image_format, seed=seed)


@app.command()
def bench(
    suite: str = typer.Argument("all", help="all, or one of: distill, data, onnx, int8, cache, memory, scale."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write the results as Markdown here."),
    quick: bool = typer.Option(False, "--quick", help="Smaller sizes (for a smoke run)."),
) -> None:
    """Measure speed ratios side by side in one run (see docs/benchmarks.md)."""
    _call_stage("bench", suite=suite, output=str(output) if output else None, quick=quick)
