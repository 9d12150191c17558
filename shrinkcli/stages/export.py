"""`shrink export`: a trained backbone -> deployable ONNX (fp32 / fp16 / int8) and safetensors files.

Every ONNX variant is checked against the fp32 torch model on the same images; a failed check
marks the run failed and exits 1 (unless --no-check), because an export that only warns ships
broken models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shrinkcli import log
from shrinkcli.atomic import temp_dir
from shrinkcli.config import ExportConfig
from shrinkcli.errors import BadInputError, GateFailedError
from shrinkcli.rundir import Artifact, RunDir, RunOptions, newest_run, resolve_artifact

FILES = {"onnx": "model.onnx", "onnx-fp16": "model-fp16.onnx", "onnx-int8": "model-int8.onnx",
         "safetensors": "model.safetensors"}
VARIANT_OF_KIND = {"onnx": "fp32", "onnx-fp16": "fp16", "onnx-int8": "int8"}


def resolve_source(options: RunOptions, run: str | None, weights: str | None, *,
                   allow_incomplete: bool = False) -> Artifact:
    """The weights to export: --weights FILE, --run RUN_DIR, or the newest completed distill run."""
    if run and weights:
        raise BadInputError("pass either --run or --weights, not both")
    if weights:
        return resolve_artifact(weights, ["weights"])
    if not run:
        newest = newest_run(options.project, "distill")
        if newest is None:
            raise BadInputError(f"no completed distill run under {Path(options.project) / 'distill'}",
                                hint="pass --run RUN_DIR or --weights FILE, or run `shrink distill` first")
        log.info(f"exporting the newest completed distill run: {newest}")
        run = str(newest)
    return resolve_artifact(run, ["weights", "checkpoint"], allow_incomplete=allow_incomplete)


def graph_spec(model, meta: dict[str, Any], config: ExportConfig):
    from shrinkcli.export.onnx_export import GraphSpec

    preprocess = meta.get("preprocess") or {}
    return GraphSpec(input_size=int(getattr(model, "input_size", preprocess.get("input_size", 112))),
                     mean=float(preprocess.get("mean", 127.5)), std=float(preprocess.get("std", 127.5)),
                     include_preprocess=config.include_preprocess, layout=config.preprocess_layout,
                     normalize_output=config.normalize_output,
                     channel_order=str(preprocess.get("channel_order", "RGB")))


def _validate(config: ExportConfig) -> None:
    if config.format == "safetensors" and (config.dtype != "fp32" or config.quantize):
        raise BadInputError("--dtype and --quantize apply to ONNX output",
                            hint="use --format onnx or --format all with them")
    if config.calib_images <= 0 or config.check_images <= 0:
        raise BadInputError("calib_images and check_images must be > 0")
    from shrinkcli.export import deploy

    for runtime in _runtimes(config):
        if config.format == runtime:        # `all` writes the runtimes that are installed
            deploy.require(runtime, to_write=True)


def _runtimes(config: ExportConfig) -> list[str]:
    from shrinkcli.export import deploy

    if config.format == "all":
        missing = [r for r in deploy.RUNTIMES if not deploy.available(r, to_write=True)]
        for runtime in missing:
            log.info(f'--format all: no {runtime} files (pip install "shrink[{runtime}]" adds them)')
        return [r for r in deploy.RUNTIMES if r not in missing]
    return [config.format] if config.format in deploy.RUNTIMES else []


def _parity_pixels(config: ExportConfig, spec, crop: int | None):
    from shrinkcli.evaluate.images import generated_pixels
    from shrinkcli.export.check import load_pixels

    source = config.check_data or config.calib_data
    if source:
        return load_pixels(source, config.check_images, input_size=spec.input_size, crop=crop), source
    return generated_pixels(config.check_images, spec.input_size, seed=0), "generated"


def _write_onnx_variants(model, meta, source: Artifact, config: ExportConfig, spec, out: RunDir) -> dict:
    from shrinkcli.export.fp16 import convert_fp16
    from shrinkcli.export.onnx_export import export_onnx, to_onnx_proto
    from shrinkcli.export.quantize import quantize_int8

    written: dict[str, Path] = {}
    extra: dict[str, Any] = {"source_file": Path(source.path).name}
    crop = (meta.get("preprocess") or {}).get("crop")
    if crop:    # the centre crop the model was trained with: a deployment must crop the same way
        extra["crop"] = str(int(crop))
    graph = to_onnx_proto(model, spec, opset=config.opset)   # one torch export for the fp32 and int8 forms
    written["onnx"] = export_onnx(model, out.file(FILES["onnx"]), spec, opset=config.opset, graph=graph,
                                  source_sha256=source.sha256, extra_metadata=extra, prelu=config.prelu)
    info: dict[str, Any] = {}
    if config.dtype == "fp16":
        written["onnx-fp16"] = convert_fp16(written["onnx"], out.file(FILES["onnx-fp16"]))
    if config.quantize == "int8":
        calib = None
        if config.calib_data:
            from shrinkcli.export.check import load_pixels

            pixels = load_pixels(config.calib_data, config.calib_images, input_size=spec.input_size, crop=crop)
            calib = spec.graph_input(pixels)
        if config.prelu != "split":
            info = quantize_int8(written["onnx"], out.file(FILES["onnx-int8"]), calib)
        else:
            # The fp32 split form would leave onnxruntime requantizing every ReLU's input; the
            # residual form is the one its integer kernels run fastest (shrinkcli.export.prelu).
            with temp_dir(out.path, "int8-src") as tmp:
                residual = export_onnx(model, Path(tmp) / "residual.onnx", spec, opset=config.opset, graph=graph,
                                       source_sha256=source.sha256, extra_metadata=extra, prelu="residual")
                info = quantize_int8(residual, out.file(FILES["onnx-int8"]), calib)
        written["onnx-int8"] = out.path / FILES["onnx-int8"]
    for kind, path in written.items():
        out.add_output(path, kind)
    return {"written": written, "quantization": info}


def _check_variants(model, written: dict[str, Path], config: ExportConfig, spec, crop) -> dict[str, dict]:
    from shrinkcli.export.check import parity_check, torch_embeddings

    pixels, origin = _parity_pixels(config, spec, crop)
    reference = torch_embeddings(model, spec, pixels)
    results = {}
    for kind, path in written.items():
        variant = VARIANT_OF_KIND[kind]
        result = parity_check(model, path, spec, pixels, variant=variant, min_cosine=config.min_cosine,
                              reference=reference)
        result["images_from"] = origin
        results[variant] = result
        state = "ok" if result["passed"] else "FAILED"
        log.info(f"parity {variant}: cosine min {result['min_cosine']:.6f} mean {result['mean_cosine']:.6f} "
                 f"(need >= {result['min_cosine_required']}) {state}")
    return results


def _write_safetensors(model, meta, source: Artifact, out: RunDir) -> tuple[Path, str]:
    import torch

    from shrinkcli.models.io import load_model, save_model_safetensors

    path = out.file(FILES["safetensors"])
    save_model_safetensors(model, path, preprocess=meta.get("preprocess") or {},
                           extra={"source_sha256": source.sha256})
    out.add_output(path, "safetensors")
    # Rebuild from the file alone: the promise of this format is "no other file needed".
    rebuilt, _ = load_model(path)
    original, loaded = model.state_dict(), rebuilt.state_dict()
    exact = original.keys() == loaded.keys() and all(torch.equal(original[k], loaded[k]) for k in original)
    if not exact:
        raise GateFailedError(f"{path} does not reload to the same weights", hint="report this model")
    return path, "bit-exact"


def _check_finite(model, source: Artifact) -> None:
    """A model with NaN/inf weights exports fine and parity-checks against itself: refuse it."""
    import torch

    bad = [name for name, t in (*model.named_parameters(), *model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise GateFailedError(f"{source.path} has non-finite weights in {len(bad)} tensor(s), e.g. {bad[0]}",
                              hint="export a checkpoint from before the training diverged")


def run(config: ExportConfig, options: RunOptions) -> dict[str, Any]:
    from shrinkcli.models.io import load_model

    _validate(config)
    source = resolve_source(options, config.run, config.weights, allow_incomplete=config.allow_incomplete)
    model, meta = load_model(source.path)
    model = model.float().eval()
    _check_finite(model, source)
    spec = graph_spec(model, meta, config)
    out = options.create("export", config.to_dict())
    out.set_device("cpu")
    out.add_input(source, "weights")
    try:
        return _export(model, meta, source, config, spec, out)
    except BaseException:
        # A failed or interrupted export must never be picked up as a finished one by later stages.
        if out.manifest["status"] == "running":
            out.finish("failed")
        raise


def _export(model, meta, source: Artifact, config: ExportConfig, spec, out: RunDir) -> dict[str, Any]:
    results: dict[str, Any] = {"source": str(source.path), "arch": meta.get("arch"),
                               "arch_kwargs": meta.get("arch_kwargs")}
    written: dict[str, Path] = {}
    if config.format in ("onnx", "all"):
        onnx_out = _write_onnx_variants(model, meta, source, config, spec, out)
        written.update(onnx_out["written"])
        if onnx_out["quantization"]:
            results["quantization"] = onnx_out["quantization"]
        if config.check:
            crop = (meta.get("preprocess") or {}).get("crop")
            results["parity"] = _check_variants(model, written, config, spec, crop)
        else:
            results["parity"] = "skipped (--no-check)"
    runtimes = _runtimes(config)
    if runtimes:
        written.update(_write_runtimes(runtimes, model, meta, source, config, spec, out, results))
    if config.format in ("safetensors", "all"):
        written["safetensors"], results["safetensors_roundtrip"] = _write_safetensors(model, meta, source, out)
    from shrinkcli.export.deploy import deployed_bytes

    results["sizes_bytes"] = {path.name: deployed_bytes(path) for path in written.values()}
    out.set_results(**results)
    failed = [v for v, r in (results["parity"] if isinstance(results.get("parity"), dict) else {}).items()
              if not r["passed"]]
    report = _report(results, written, out)
    if failed:
        out.finish("failed")
        details = ", ".join(f"{v} min cosine {results['parity'][v]['min_cosine']:.6f} < "
                            f"{results['parity'][v]['min_cosine_required']}" for v in failed)
        raise GateFailedError(f"export parity check failed: {details}",
                              hint=f"artifacts kept in {out.path} for inspection; --no-check skips the check",
                              result=report)
    out.finish("completed")
    return report


def _report(results: dict[str, Any], written: dict[str, Path], out: RunDir) -> dict[str, Any]:
    parity = results.get("parity") if isinstance(results.get("parity"), dict) else {}
    rows = []
    for kind, path in written.items():
        check = parity.get(VARIANT_OF_KIND.get(kind, kind), {})
        if kind == "safetensors":
            verdict = f"reload {results.get('safetensors_roundtrip')}"
        elif check:
            verdict = "pass" if check["passed"] else "FAIL"
        else:
            verdict = "skipped"
        rows.append({"file": path.name, "kind": kind, "size_mb": round(results["sizes_bytes"][path.name] / 2**20, 3),
                     "min_cosine": check.get("min_cosine", ""), "mean_cosine": check.get("mean_cosine", ""),
                     "max_abs_diff": check.get("max_abs_diff", ""), "check": verdict})
    summary = {"run_dir": str(out.path), "source": results["source"], "arch": results["arch"]}
    for variant, check in parity.items():
        summary[f"{variant}_min_cosine"] = check["min_cosine"]
    summary["status"] = "ok" if all(c["passed"] for c in parity.values()) else "check failed"
    return {"summary": summary, "tables": {"exported artifacts": rows}}


def _write_runtimes(runtimes, model, meta, source: Artifact, config: ExportConfig, spec, out: RunDir,
                    results: dict[str, Any]) -> dict[str, Path]:
    """ncnn / OpenVINO / TFLite files, each gated in its own runtime (shrinkcli.export.deploy)."""
    from shrinkcli.export import deploy
    from shrinkcli.evaluate.images import generated_pixels
    from shrinkcli.export.check import load_pixels, torch_embeddings

    crop = (meta.get("preprocess") or {}).get("crop")
    extra = {"source_file": Path(source.path).name, "source_sha256": source.sha256}
    if crop:
        extra["crop"] = str(int(crop))
    if config.calib_data:
        calib = load_pixels(config.calib_data, config.calib_images, input_size=spec.input_size, crop=crop)
    else:
        calib = generated_pixels(config.calib_images, spec.input_size, seed=1)
        if config.quantize:
            log.warning("no --calib-data: ncnn/OpenVINO/TFLite int8 is calibrated on generated images; "
                        "pass --calib-data with a few hundred faces")
    pixels, origin = _parity_pixels(config, spec, crop) if config.check else (None, None)
    reference = torch_embeddings(model, spec, pixels) if config.check else None
    parity = results["parity"] if isinstance(results.get("parity"), dict) else {}
    written: dict[str, Path] = {}
    for runtime in runtimes:
        files = deploy.write_runtime(runtime, model, spec, out.path, variants=deploy.variants_for(runtime, config),
                                     calib_pixels=calib, metadata=extra)
        rspec = deploy.runtime_spec(runtime, spec)
        for variant, path in files.items():
            kind = deploy.kind_of(runtime, variant)
            written[kind] = path
            for part in deploy.module(runtime).companion_files(path)[1:] + [deploy.sidecar(path)]:
                out.add_output(part, f"{kind}-{'metadata' if part.suffix == '.json' else 'weights'}")
            out.add_output(path, kind)
            if not config.check:
                continue
            result = deploy.gate(path, variant, rspec.graph_input(pixels), reference, config.min_cosine)
            result["images_from"] = origin
            parity[kind] = result
            log.info(f"parity {kind} (in {runtime}): cosine min {result['min_cosine']:.6f} mean "
                     f"{result['mean_cosine']:.6f} (need >= {result['min_cosine_required']}) "
                     f"{'ok' if result['passed'] else 'FAILED'}")
    results["parity"] = parity if config.check else "skipped (--no-check)"
    return written
