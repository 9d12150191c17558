"""`shrink distill`: train a student from a frozen teacher (ShrinkTeaNet multi-stage angular distillation).

Inputs: a teacher (a teacher run dir, a checkpoint or an insightface backbone.pth), training images
(labels optional with --no-labels), optionally validation pairs. Outputs in the run dir:
weights/last.pt + best.pt (full training state, from the engine), model.safetensors (the student
backbone alone, with preprocessing metadata and the teacher's sha256), metrics, and with --val a
final teacher-vs-student verification table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shrinkcli import log
from shrinkcli.config import DistillConfig, TrainConfig
from shrinkcli.errors import BadInputError
from shrinkcli.rundir import Artifact, RunDir, RunOptions, resolve_artifact, verify_recorded_inputs

TEACHER_KINDS = ["weights", "checkpoint"]
PREPROCESS_KEYS = ("input_size", "crop", "mean", "std")


def resolve_preprocess(config: DistillConfig, teacher_preprocess: dict[str, Any],
                       teacher_input_size: int) -> DistillConfig:
    """The student sees what the teacher was trained on: each of input_size/crop/mean/std comes from
    the teacher's metadata unless the user set it (recipe, option or --set). An input size that was
    set and differs from the teacher's is refused: the two networks must see the same images."""
    if config.is_set("input_size") and config.input_size != teacher_input_size:
        raise BadInputError(f"input_size={config.input_size} (from {config.source('input_size')}) differs from the "
                            f"teacher's {teacher_input_size}",
                            hint="teacher and student see the same images; drop --input-size or use a teacher "
                                 f"trained at {config.input_size}")
    defaults = TrainConfig()
    changes = {}
    for key in PREPROCESS_KEYS:
        if config.is_set(key):
            continue
        theirs = teacher_input_size if key == "input_size" else teacher_preprocess.get(key, getattr(defaults, key))
        if getattr(config, key) != theirs:
            changes[key] = theirs
    if changes:
        log.info("preprocessing from the teacher: " + ", ".join(f"{k}={v}" for k, v in changes.items()))
    return config.replace("teacher preprocessing", source="teacher", **changes) if changes else config


def load_teacher(spec: str | None, config: DistillConfig | None = None):
    """(artifact, frozen-ready model, meta) from a run dir, a checkpoint, a backbone.pth or an ONNX file
    (whose input contract, when the file does not record it, comes from `config`)."""
    from shrinkcli.models.io import load_model

    if not spec:
        raise BadInputError("no teacher given", hint="pass --teacher RUN_DIR|CHECKPOINT|backbone.pth|model.onnx")
    artifact = resolve_artifact(spec, TEACHER_KINDS, allow_incomplete=bool(config and config.allow_incomplete))
    if artifact.path.suffix.lower() == ".onnx":
        from shrinkcli.models.onnx_import import load_onnx_teacher
        from shrinkcli.stages.teacher_onnx import contract_options

        model, meta = load_onnx_teacher(artifact.path, contract_options(config) if config else None,
                                        parity_data=config.data if config else None)
        return artifact, model, meta   # an embedding-only teacher: see embedding_only_config
    model, meta = load_model(artifact.path)
    if getattr(model, "stage_channels", None) is None:
        raise BadInputError(f"teacher {artifact.path} ({meta['arch']}) exposes no stage outputs",
                            hint="use a shrink-registered architecture as teacher")
    return artifact, model, meta


def _open_training_data(config: DistillConfig):
    from shrinkcli.data import open_dataset

    if not config.data:
        raise BadInputError("no training data given", hint="pass --data, e.g. --data synthetic or --data folder:PATH")
    options = dict(input_size=config.input_size, crop=config.crop, mean=config.mean, std=config.std,
                   skip_corrupt=config.skip_corrupt)
    try:
        return open_dataset(config.data, **options)
    except BadInputError:
        from shrinkcli.distill.unlabelled import UnlabelledImages, unlabelled_root

        root = unlabelled_root(config.data)
        if config.labels or root is None:
            raise
        # --no-labels: a plain directory of images (no identity sub-folders) is enough.
        log.info(f"{config.data}: no labelled dataset found; using every image under {root} without labels")
        return UnlabelledImages(root, spec=config.data, **options)


def _open_val_pairs(config: DistillConfig):
    if not config.val:
        return None
    from shrinkcli.data import load_pairs

    return load_pairs(config.val, input_size=config.input_size, crop=config.crop)


def build_task(config: DistillConfig, teacher, teacher_sha256: str, dataset, cache_dir: Path | None,
               teacher_artifact: Artifact | None = None):
    """Student, adapters, margin head, relational terms and cache request assembled into a DistillTask.
    `teacher_artifact` lets teacher-centre heads find the teacher run's own classifier."""
    from shrinkcli.distill import CacheRequest, DistillTask, cache_key
    from shrinkcli.losses.distill import DistillCriterion
    from shrinkcli.models import create_model

    student = create_model(config.student, embedding_size=config.embedding_size, input_size=config.input_size,
                           width=config.width)
    criterion = DistillCriterion(student_channels=list(student.stage_channels),
                                 teacher_channels=list(teacher.stage_channels or student.stage_channels),
                                 student_embedding=student.embedding_size, teacher_embedding=teacher.embedding_size,
                                 embed_loss=config.embed_loss, stage_loss=config.stage_loss,
                                 embed_weight=config.embed_weight, stage_weights=config.stage_weights)
    if student.embedding_size != teacher.embedding_size and criterion.embed_active:
        log.info(f"embedding sizes differ (student {student.embedding_size}, teacher {teacher.embedding_size}): "
                 "a linear adapter maps the student's embedding for the loss (not exported)")
    head = None
    if config.labels:
        from shrinkcli.losses.centres import build_margin_head

        head = build_margin_head(config, student_embedding=student.embedding_size,
                                 teacher_embedding=teacher.embedding_size, dataset=dataset,
                                 teacher_path=teacher_artifact.path if teacher_artifact else None,
                                 teacher_run_dir=teacher_artifact.run_dir if teacher_artifact else None)
    from shrinkcli.losses.relational import build_relational

    relational = build_relational(config)
    request = None
    if config.cache_teacher and (criterion.needs_teacher or relational is not None):
        key = cache_key(teacher_sha256=teacher_sha256, data_spec=config.data, num_items=len(dataset),
                        labels=getattr(dataset, "labels", None), input_size=config.input_size, crop=config.crop,
                        mean=config.mean, std=config.std)
        directory = Path(config.cache_dir) / key[:16] if config.cache_dir else cache_dir
        request = CacheRequest(directory=directory, key=key, dataset=dataset, flips=2 if config.flip else 1,
                               with_stages=criterion.needs_teacher_stages or config.cache_stages,
                               batch_size=config.batch_size, workers=max(0, config.workers),
                               stage_dtype=config.cache_dtype)
    return DistillTask(student=student, teacher=teacher, criterion=criterion, head=head, cache=request,
                       relational=relational, compile_teacher=config.compile_teacher)


def _record_data(run_dir: RunDir, config: DistillConfig, dataset) -> None:
    """What was trained on. Not an `add_input`: hashing a multi-GB train.rec on every run costs
    minutes, and a spec such as synthetic:64 has no file at all; the label checksum identifies it."""
    import hashlib

    import numpy as np

    labels = np.ascontiguousarray(np.asarray(getattr(dataset, "labels", []), dtype=np.int64))
    run_dir.set_results(data={"spec": str(config.data), "images": len(dataset),
                              "identities": int(getattr(dataset, "num_classes", 0)),
                              "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest()},
                        preprocess={k: getattr(config, k) for k in PREPROCESS_KEYS})


def _open_run_dir(config: DistillConfig, given: DistillConfig, options: RunOptions, resumed: RunDir | None,
                  teacher_artifact: Artifact, dataset, is_main: bool) -> RunDir | None:
    """The run dir (None on non-main ranks), with the teacher and the data recorded."""
    run_dir = resumed
    if resumed is not None:
        verify_recorded_inputs(resumed.manifest, ["teacher"], f"distill --resume {resumed.path}")
        resumed.begin()     # validated: only now does the manifest say `running`
    if resumed is None and is_main:
        # The manifest keeps the config as given (the pipeline compares it to decide whether a stage
        # is up to date); what the teacher filled in is in results.preprocess.
        run_dir = options.create("distill", given.to_dict())
    if run_dir is not None:
        run_dir.add_input(Artifact(teacher_artifact.path, "teacher", teacher_artifact.sha256,
                                   teacher_artifact.run_dir), "teacher")
        _record_data(run_dir, config, dataset)
    return run_dir


def run(config: DistillConfig, options: RunOptions) -> dict[str, Any]:
    import torch

    from shrinkcli.distill.report import teacher_student_table
    from shrinkcli.engine import Trainer
    from shrinkcli.engine.distributed import env_dist_info
    from shrinkcli.engine.resume import resume_run
    from shrinkcli.models.io import save_model_safetensors

    is_main = env_dist_info().is_main
    resume = options.resume
    resumed, checkpoint = None, None
    if resume is not None:
        resumed, checkpoint, config = resume_run(resume, "distill", config, options, is_main=is_main)
    from shrinkcli.models.onnx_teacher import embedding_only_config

    teacher_artifact, teacher, meta = load_teacher(config.teacher, config)
    given, config = config, resolve_preprocess(config, meta.get("preprocess") or {}, int(teacher.input_size))
    config = embedding_only_config(config, teacher)
    dataset = _open_training_data(config)
    if config.labels and getattr(dataset, "num_classes", 0) < 2:
        raise BadInputError(f"{config.data} has {getattr(dataset, 'num_classes', 0)} identity label(s): "
                            "the margin loss needs at least 2", hint="use --no-labels to learn from the teacher alone")
    val_pairs = _open_val_pairs(config)
    run_dir = _open_run_dir(config, given, options, resumed, teacher_artifact, dataset, is_main)

    torch.manual_seed(config.seed)      # student, adapters and head start the same for a given seed
    task = build_task(config, teacher, teacher_artifact.sha256, dataset,
                      run_dir.path / "teacher_cache" if run_dir is not None else None, teacher_artifact)
    trainer = Trainer(config, run_dir, task, dataset, val_pairs)
    summary = trainer.fit(resume=checkpoint)  # marks the manifest interrupted/failed itself
    if run_dir is None:
        return {"summary": summary}

    weights = save_model_safetensors(task.student, run_dir.file("model.safetensors"), dict(trainer.preprocess),
                                     extra={"teacher_sha256": teacher_artifact.sha256, "teacher_arch": meta["arch"]})
    run_dir.add_output(weights, "weights")
    result: dict[str, Any] = {"summary": {**summary, "run_dir": str(run_dir.path), "weights": str(weights),
                                          "teacher": str(teacher_artifact.path),
                                          "teacher_forward_steps": task.teacher_steps,
                                          "cached_teacher": task.cache is not None}}
    if val_pairs is not None:
        rows = teacher_student_table(teacher, task.student, val_pairs, mean=config.mean, std=config.std,
                                     device=trainer.device, channels_last=config.channels_last)
        result["tables"] = {"verification: teacher vs student": rows}
        run_dir.set_results(verification=rows)
    run_dir.set_results(weights=str(weights), teacher_sha256=teacher_artifact.sha256,
                        cached_teacher=task.cache is not None)
    run_dir.finish()
    return result
