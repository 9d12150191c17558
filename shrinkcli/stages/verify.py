"""`shrink verify`: parity of an artifact with its reference, verification accuracy on pairs,
rank-1 identification, size and latency -- each with an optional gate that fails the command.

Outputs in the run dir: report.json (everything), report.md (teacher-vs-student table),
roc.png. A failed gate still writes all of them, marks the run failed and exits 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shrinkcli import log
from shrinkcli.atomic import atomic_write_json
from shrinkcli.config import VerifyConfig
from shrinkcli.errors import BadInputError, GateFailedError
from shrinkcli.rundir import RunDir, RunOptions

def _reference_from_run(source: str) -> str | None:
    """An export run dir records the weights it exported: the natural parity reference."""
    from shrinkcli.rundir import load_manifest, verify_recorded_inputs

    path = Path(source)
    if not path.is_dir():
        return None
    inputs = [r for r in load_manifest(path).get("inputs", [])
              if isinstance(r, dict) and r.get("kind") in ("weights", "checkpoint")]
    if not inputs:
        return None
    # The parity check is only meaningful against the very weights the artifact was made from.
    verify_recorded_inputs({"inputs": inputs[-1:]}, ("weights", "checkpoint"), f"verify --model {path} (its reference)")
    return str(inputs[-1]["path"])


def _crop_for(runner, config: VerifyConfig):
    """--crop when given, else the centre crop the model records in its preprocessing."""
    return config.crop if config.crop is not None else runner.crop


def _describe(runner, latency_seconds: float) -> dict[str, Any]:
    info = {"path": str(runner.path), "file": runner.path.name, "kind": runner.kind, "dtype": runner.dtype,
            "sha256": runner.sha256, "arch": runner.arch, "input_size": runner.input_size, "crop": runner.crop,
            "params": runner.params(), "macs": runner.macs(), "size_bytes": runner.size_bytes()}
    if latency_seconds > 0:
        info["latency_ms_b1"] = round(runner.latency_ms(1, seconds=latency_seconds), 3)
        info["latency_ms_b32"] = round(runner.latency_ms(32, seconds=latency_seconds), 3)
        info["latency_runtime"] = "onnxruntime (CPU)" if runner.kind == "onnx" else "torch eager, channels_last"
    return info


def _check_parity(model, reference, config: VerifyConfig, crop) -> dict[str, Any]:
    from shrinkcli.evaluate.images import parity_pixels
    from shrinkcli.evaluate.parity import gate

    if reference.input_size != model.input_size:
        raise BadInputError(f"reference input size {reference.input_size} differs from the model's {model.input_size}",
                            hint="compare an artifact with the weights it was exported from")
    from shrinkcli.evaluate.store import is_store

    images = None if is_store(config.data) else config.data   # a store holds no pixels: generated images
    pixels, origin = parity_pixels(images, config.parity_images, input_size=model.input_size, crop=crop)
    result = gate(reference.raw(pixels, batch_size=config.batch_size), model.raw(pixels, batch_size=config.batch_size),
                  model.dtype, config.min_cosine)
    result.update(images_from=origin, reference=str(reference.path), max_abs_diff_allowed=config.max_abs_diff)
    log.info(f"parity vs {reference.path.name}: cosine min {result['min_cosine']:.6f} mean {result['mean_cosine']:.6f}, "
             f"max abs diff {result['max_abs_diff']:.3g}")
    return result


class PairsCache:
    """Pairs decoded once per (input size, crop): teacher and student usually share them."""

    def __init__(self, config: VerifyConfig):
        self.config = config
        self.loaded: dict[tuple, Any] = {}

    def get(self, input_size: int, crop):
        from shrinkcli.data import load_pairs

        key = (input_size, crop)
        if key not in self.loaded:
            self.loaded[key] = load_pairs(self.config.pairs, data_root=self.config.data,
                                          input_size=input_size, crop=crop)
        return self.loaded[key]


def _accuracy(runner, pairs, config: VerifyConfig, role: str = "model") -> dict[str, Any]:
    from shrinkcli.evaluate.verification import evaluate_pairs

    emb = runner.embed(pairs.images, batch_size=config.batch_size, flip=config.flip)
    result = evaluate_pairs(emb, pairs, nfolds=config.folds, details=True)
    for array_key in ("correct", "distances"):
        result.pop(array_key)
    log.info(f"{role} ({runner.path.name}): accuracy {100 * result['accuracy']:.2f} +- {100 * result['accuracy_std']:.2f} "
             f"on {result['pairs']} pairs")
    return result


def _identification(runner, config: VerifyConfig, crop, role: str = "model") -> dict[str, Any]:
    import numpy as np

    from shrinkcli.evaluate.identification import rank1_from_labelled
    from shrinkcli.evaluate.sources import StoreMismatchError, distractor_rows, labelled_embeddings

    options = dict(crop=crop, batch_size=config.batch_size, flip=config.flip, role=role)
    try:
        emb, labels = labelled_embeddings(config.data, runner, **options)
        counts = np.bincount(np.unique(labels, return_inverse=True)[1])
        if (counts >= 2).sum() == 0:
            return {"skipped": f"{config.data} has no identity with two or more images"}
        distractors = None
        if config.distractors:
            distractors = distractor_rows(config.distractors, runner, probes=int((counts - 1).sum()), **options)
        result = rank1_from_labelled(emb, labels, distractors)
    except StoreMismatchError as exc:
        if role == "model":
            raise
        return _skipped_store(role, exc)
    log.info(f"{role} ({runner.path.name}): rank-1 {100 * result['rank1']:.2f}% ({result['probes']} probes)")
    return result


def _skipped_store(role: str, exc: Exception) -> dict[str, Any]:
    """A store holds one model's embeddings: the other model of the run is skipped, not failed."""
    log.warning(f"{role}: skipped ({exc})")
    return {"skipped": str(exc)}


def _record_pairs(out: RunDir, spec: str) -> None:
    """The pairs file itself when the spec names one (hashed), else the spec as given."""
    root = Path(spec.partition(":")[2]) if spec.startswith(("lfw:", "lfw-half:", "lfw-half-val:")) else Path(spec)
    candidate = root / "pairs.txt" if root.is_dir() else root
    if candidate.is_file():
        out.add_input(candidate, "pairs")
    else:
        out.manifest["inputs"].append({"path": spec, "kind": "pairs", "sha256": None})
        out.save()


def _check_stores(config: VerifyConfig, model) -> None:
    """A store of another model (or crop, flip) is refused before any work or run dir."""
    from shrinkcli.evaluate.store import FeatureStore, is_store

    for spec in (config.data, config.distractors):
        if is_store(spec):
            FeatureStore(spec).check_model(model, crop=_crop_for(model, config), flip=config.flip)


def _record_stores(out: RunDir, config: VerifyConfig) -> None:
    from shrinkcli.evaluate.sources import store_record

    for spec, kind in ((config.data, "probe-store"), (config.distractors, "distractor-store")):
        record = store_record(spec, kind) if spec else None
        if record:
            out.manifest["inputs"].append(record)
    out.save()


def _gate(name: str, value: float, op: str, limit: float) -> dict[str, Any]:
    passed = value >= limit if op == ">=" else value <= limit
    return {"name": name, "value": float(value), "op": op, "limit": float(limit), "passed": bool(passed)}


def _gates(report: dict[str, Any], config: VerifyConfig) -> list[dict[str, Any]]:
    gates = []
    parity = report.get("parity")
    if parity:
        gates.append(_gate("parity min cosine", parity["min_cosine"] if parity["finite"] else -1.0, ">=",
                           parity["min_cosine_required"]))
        if config.max_abs_diff is not None:
            gates.append(_gate("parity max abs diff", parity["max_abs_diff"], "<=", config.max_abs_diff))
    if config.min_accuracy is not None:
        gates.append(_gate("accuracy", report["accuracy"]["model"]["accuracy"], ">=", config.min_accuracy))
    if config.max_gap is not None:
        gates.append(_gate("teacher - model accuracy", report["gap"], "<=", config.max_gap))
    return gates


def _check_request(config: VerifyConfig) -> None:
    """Refuse impossible requests before any work or run dir."""
    if not config.model:
        raise BadInputError("verify needs --model", hint="a .onnx, .safetensors, .pt file or a run dir")
    if config.parity_images <= 0 or config.batch_size <= 0:
        raise BadInputError("parity_images and batch_size must be > 0")
    if config.min_accuracy is not None and not config.pairs:
        raise BadInputError("--min-accuracy needs --pairs", hint="e.g. --pairs lfw-half:../shared/data/lfw")
    if config.max_gap is not None and not (config.teacher and config.pairs):
        raise BadInputError("--max-gap needs --teacher and --pairs")
    from shrinkcli.evaluate.store import is_store

    if is_store(config.data) and config.pairs and not _pairs_have_images(config.pairs):
        raise BadInputError("--data is a feature store, which holds no images for --pairs",
                            hint="give pairs with their own images: X.bin, lfw:ROOT, lfw-half:ROOT or pairs:N@SPEC")
    if config.distractors and not config.data:
        raise BadInputError("distractors are added to the gallery of --data: pass --data too")
    if config.megaface and not (config.data and config.distractors):
        raise BadInputError("megaface needs probes (--data) and a distractor set (--set distractors=SPEC)")
    if config.ijb and not Path(config.ijb).is_dir():
        raise BadInputError(f"IJB root {config.ijb} is not a directory", hint="pass the folder with the meta files")


def _pairs_have_images(spec: str) -> bool:
    return spec.endswith(".bin") or spec.startswith(("lfw:", "lfw-half:", "lfw-half-val:")) or "@" in spec


def run(config: VerifyConfig, options: RunOptions) -> dict[str, Any]:
    from shrinkcli.evaluate.runners import open_runner

    _check_request(config)
    model = open_runner(config.model, "model", allow_incomplete=config.allow_incomplete)
    reference_source = config.reference or _reference_from_run(config.model)
    reference = (open_runner(reference_source, "reference", allow_incomplete=config.allow_incomplete)
                 if reference_source else None)
    teacher = open_runner(config.teacher, "teacher", allow_incomplete=config.allow_incomplete) if config.teacher else None
    if reference is not None and not model.crop_recorded and reference.crop is not None:
        log.info(f"{model.path.name} records no centre crop; using the reference's crop {reference.crop}")
        model.crop = reference.crop
    if config.input_size is not None and config.input_size != model.input_size:
        raise BadInputError(f"--input-size {config.input_size} differs from the model's {model.input_size}")
    _check_stores(config, model)
    pairs = PairsCache(config)
    if config.pairs:   # decode now: a bad pairs spec fails before a run dir exists
        pairs.get(model.input_size, _crop_for(model, config))
    out = options.create("verify", config.to_dict())
    out.set_device("cpu")
    for role, runner in (("model", model), ("reference", reference), ("teacher", teacher)):
        if runner is not None:
            out.add_input(runner.path, role)
    _record_stores(out, config)
    try:
        return _verify(config, out, model, reference, teacher, pairs)
    except BaseException:
        if out.manifest["status"] == "running":
            out.finish("failed")
        raise


def _verify(config: VerifyConfig, out: RunDir, model, reference, teacher, cache: PairsCache) -> dict[str, Any]:
    from shrinkcli.evaluate.report import model_row, write_markdown, write_roc_plot

    crop = _crop_for(model, config)
    report: dict[str, Any] = {"model": _describe(model, config.latency_seconds)}
    if teacher is not None:
        report["teacher"] = _describe(teacher, config.latency_seconds)
    if reference is not None:
        report["parity"] = _check_parity(model, reference, config, crop)
    curves = {}
    if config.pairs:
        report["accuracy"] = {}
        for role, runner in (("model", model), ("teacher", teacher)):
            if runner is None:
                continue
            pairs = cache.get(runner.input_size, _crop_for(runner, config))
            if "pairs" not in report:
                report["pairs"] = {"spec": config.pairs, "pairs": len(pairs), "source": pairs.source}
                _record_pairs(out, config.pairs)
            result = _accuracy(runner, pairs, config, role)
            curves[f"{role}: {runner.path.name}"] = result.pop("roc")
            report["accuracy"][role] = result
        report["pairs"].update(folds=report["accuracy"]["model"]["folds"],
                               folds_from=report["accuracy"]["model"]["folds_from"])
        if teacher is not None:
            report["gap"] = report["accuracy"]["teacher"]["accuracy"] - report["accuracy"]["model"]["accuracy"]
    if config.data and config.identification:
        report["identification"] = {role: _identification(runner, config, _crop_for(runner, config), role)
                                    for role, runner in (("model", model), ("teacher", teacher)) if runner}
    _large_protocols(report, config, model, teacher)
    report["gates"] = _gates(report, config)
    rows = [model_row("model", report["model"], (report.get("accuracy") or {}).get("model"), None)]
    if teacher is not None:
        rows.insert(0, model_row("teacher", report["teacher"], (report.get("accuracy") or {}).get("teacher"), None))
        rows[1] = model_row("model", report["model"], (report.get("accuracy") or {}).get("model"), report.get("gap"))
    # ROC points go to the file (for plots elsewhere), not into the printed result
    atomic_write_json(out.path / "report.json", {**report, "roc": curves})
    out.add_output(out.path / "report.json", "report")
    out.add_output(write_markdown(out.path / "report.md", report, rows), "report-md")
    if curves:
        out.add_output(write_roc_plot(out.path / "roc.png", curves), "roc-plot")
    return _finish(out, report, rows)


def _large_protocols(report: dict[str, Any], config: VerifyConfig, model, teacher) -> None:
    from shrinkcli.evaluate.protocols import run_ijb, run_megaface

    runners = [(role, runner) for role, runner in (("model", model), ("teacher", teacher)) if runner]
    options = dict(batch_size=config.batch_size, flip=config.flip)
    if config.ijb:
        report["ijb"] = {role: run_ijb(r, config.ijb, crop=_crop_for(r, config), **options) for role, r in runners}
        for role, result in report["ijb"].items():
            log.info(f"{role}: IJB TAR@FAR " + ", ".join(f"{k}={v:.4f}" for k, v in result["tar_at_far"].items()))
    if config.megaface:
        from shrinkcli.evaluate.sources import StoreMismatchError

        report["megaface"] = {}
        for role, r in runners:
            try:
                report["megaface"][role] = run_megaface(r, config.data, config.distractors, crop=_crop_for(r, config),
                                                        role=role, **options)
            except StoreMismatchError as exc:
                if role == "model":
                    raise
                report["megaface"][role] = _skipped_store(role, exc)
        for role, result in report["megaface"].items():
            if "skipped" in result:
                continue
            log.info(f"{role}: MegaFace rank-1 {100 * result['rank1']:.2f}% against {result['distractors']} distractors")


def _finish(out: RunDir, report: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"run_dir": str(out.path), "model": report["model"]["file"]}
    if report.get("parity"):
        summary.update(parity_min_cosine=report["parity"]["min_cosine"], parity_max_abs_diff=report["parity"]["max_abs_diff"])
    for role, result in (report.get("accuracy") or {}).items():
        summary[f"{role}_accuracy"] = result["accuracy"]
        summary[f"{role}_accuracy_std"] = result["accuracy_std"]
    if report.get("gap") is not None:
        summary["gap"] = report["gap"]
    for role, result in (report.get("identification") or {}).items():
        if "rank1" in result:
            summary[f"{role}_rank1"] = result["rank1"]
    failed = [g for g in report["gates"] if not g["passed"]]
    summary["status"] = "FAILED: " + ", ".join(g["name"] for g in failed) if failed else "ok"
    out.set_results(summary=summary, gates=report["gates"])
    from shrinkcli.evaluate.report import compact_row

    result = {"summary": summary, "tables": {"verify": [compact_row(r) for r in rows]}, "report": report}
    if failed:
        out.finish("failed")
        details = "; ".join(f"{g['name']} {g['value']:.6g} (need {g['op']} {g['limit']:.6g})" for g in failed)
        raise GateFailedError(f"verify gate failed: {details}", hint=f"report in {out.path / 'report.md'}",
                              result=result)
    out.finish("completed")
    return result
