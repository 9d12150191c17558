"""`shrink teacher`: train a teacher with a margin loss, or import existing teacher weights.

Training (--data): an IResNet (or any registered model) with an ArcFace (default) or CosFace head,
optionally PartialFC-sampled, on the shared engine. Writes weights/last.pt and weights/best.pt
(full training state), model.safetensors (the backbone with preprocessing metadata), metrics.
Import (--load): insightface backbone.pth, our .pt/.safetensors or a full training checkpoint; the
architecture is inferred from the weights (--arch overrides); a few images are embedded to check
the outputs are finite and not constant, then model.safetensors is written. An ONNX file (an
insightface model pack's recognition model, or any face model) goes through `teacher_onnx`. Either way the run dir
is what `shrink distill --teacher` accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shrinkcli import log
from shrinkcli.config import TeacherConfig
from shrinkcli.errors import BadInputError, GateFailedError
from shrinkcli.rundir import RunDir, RunOptions, verify_recorded_inputs

CHECK_IMAGES = 8
HASH_LIMIT_BYTES = 2 << 30  # larger data files are recorded by size: hashing would take minutes


class MarginTask:
    """Engine task: backbone embedding -> margin head cross-entropy."""

    def __init__(self, backbone, head):
        self.backbone, self.head = backbone, head
        self.backbone_step, self.head_step = backbone, head

    def modules(self):
        return {"backbone": self.backbone, "head": self.head}

    def distribute(self, wrap):
        from shrinkcli.losses.partial_fc import is_sharded

        self.backbone_step = wrap(self.backbone)
        # A sharded head (every run under torchrun) is model-parallel: it must not be all-reduced.
        self.head_step = self.head if is_sharded(self.head) else wrap(self.head)

    def loss(self, images, labels, indices, flipped):
        loss = self.head_step(self.backbone_step(images), labels)
        return loss, {"margin_loss": loss.detach()}

    def embedder(self):
        return self.backbone


def run(config: TeacherConfig, options: RunOptions) -> dict[str, Any]:
    resume = options.resume
    if config.load:
        if resume is not None:
            raise BadInputError("--load and --resume exclude each other",
                                hint="--load imports weights; --resume continues a training run")
        return import_teacher(config, options)
    return train_teacher(config, options, resume=resume)


def _record_data(run_dir: RunDir, spec: str, dataset) -> None:
    path = Path(spec.partition(":")[2] if ":" in spec and not Path(spec).exists() else spec)
    record: dict[str, Any] = {"kind": "data", "spec": spec, "images": len(dataset),
                              "identities": int(getattr(dataset, "num_classes", 0))}
    if path.is_file() and path.stat().st_size <= HASH_LIMIT_BYTES:
        art = run_dir.add_input(path, "data")
        record.update(path=str(art.path.resolve()), sha256=art.sha256)
    elif path.exists():
        record.update(path=str(path.resolve()), bytes=path.stat().st_size if path.is_file() else None)
    run_dir.manifest["inputs"] = [r for r in run_dir.manifest["inputs"] if r.get("kind") != "data"] + [record]
    run_dir.save()


def _set_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def train_teacher(config: TeacherConfig, options: RunOptions, *, resume: str | None = None) -> dict[str, Any]:
    from shrinkcli.data import load_pairs, open_dataset
    from shrinkcli.engine import Trainer, resume_run
    from shrinkcli.engine.distributed import env_dist_info, init_distributed
    from shrinkcli.losses.partial_fc import margin_head
    from shrinkcli.models import create_model
    from shrinkcli.models.io import save_model_safetensors

    init_distributed(config.device)
    is_main = env_dist_info().is_main
    checkpoint = None
    run_dir = None
    if resume is not None:
        run_dir, checkpoint, config = resume_run(resume, "teacher", config, options, is_main=is_main)
    if not config.data:
        raise BadInputError("no training data", hint="pass --data (e.g. synthetic, folder:PATH, rec:PATH/train.rec) "
                                                     "or --load to import existing weights")
    dataset = open_dataset(config.data, input_size=config.input_size, crop=config.crop, mean=config.mean,
                           std=config.std, skip_corrupt=config.skip_corrupt)
    num_classes = int(dataset.num_classes)
    labels = dataset.labels
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise BadInputError(f"{config.data}: labels must lie in 0..{num_classes - 1}, "
                            f"found {int(labels.min())}..{int(labels.max())}",
                            hint="repack the data with `shrink data pack`")
    val_pairs = load_pairs(config.val, input_size=config.input_size, crop=config.crop) if config.val else None
    _set_seed(config.seed)
    backbone = create_model(config.arch, embedding_size=config.embedding_size, input_size=config.input_size,
                            width=config.width)
    head = margin_head(backbone.embedding_size, num_classes, kind=config.head, margin=config.margin,
                       scale=config.scale, sample_rate=config.sample_rate)
    if resume is None and is_main:
        run_dir = options.create("teacher", config.to_dict())
    if run_dir is not None:
        if resume is not None:
            verify_recorded_inputs(run_dir.manifest, ["data"], f"teacher --resume {run_dir.path}")
        run_dir.begin()     # a resume is validated (checkpoint, config, data): only now is the run `running`
        _record_data(run_dir, config.data, dataset)
    params = sum(p.numel() for p in backbone.parameters())
    log.info(f"teacher {config.arch}: {params / 1e6:.2f}M params, {config.head} head over {num_classes} identities"
             f" ({head.num_sampled} sampled per step), {len(dataset)} images")
    trainer = Trainer(config, run_dir, MarginTask(backbone, head), dataset, val_pairs)
    summary = trainer.fit(resume=checkpoint)  # marks the manifest interrupted/failed itself
    if run_dir is None:
        return {"summary": summary}
    backbone.eval()
    weights = save_model_safetensors(backbone, run_dir.file("model.safetensors"), trainer.preprocess,
                                     extra={"head": config.head, "margin": head.margin, "scale": head.scale,
                                            "num_classes": num_classes, "train_data": config.data})
    run_dir.add_output(weights, "weights")
    run_dir.set_results(weights=str(weights), params=params, identities=num_classes)
    run_dir.finish()
    return {"run_dir": str(run_dir.path),
            "summary": {"run_dir": str(run_dir.path), "arch": config.arch, "params": params, **summary,
                        "weights": str(weights)}}


def _check_images(config: TeacherConfig, input_size: int, preprocess: dict):
    """A few normalised images: from --data when given, otherwise seeded random pixels."""
    import torch

    mean, std = float(preprocess.get("mean", 127.5)), float(preprocess.get("std", 127.5))
    if config.data:
        from shrinkcli.data import open_dataset

        dataset = open_dataset(config.data, input_size=input_size, crop=preprocess.get("crop", config.crop),
                               mean=mean, std=std, skip_corrupt=True)
        step = max(1, len(dataset) // CHECK_IMAGES)
        images = [dataset[i][0] for i in range(0, len(dataset), step)][:CHECK_IMAGES]
        if len(images) >= 2:
            return torch.stack(images), f"{len(images)} images of {config.data}"
    generator = torch.Generator().manual_seed(config.seed)
    pixels = torch.randint(0, 256, (CHECK_IMAGES, 3, input_size, input_size), generator=generator).float()
    return (pixels - mean) / std, f"{CHECK_IMAGES} random images"


def check_embeddings(model, images) -> dict[str, Any]:
    """Finite, non-zero embeddings that differ between different images, or GateFailedError."""
    import torch

    with torch.no_grad():
        emb = model(images).float()
    if not torch.isfinite(emb).all():
        raise GateFailedError("the imported teacher produces non-finite embeddings",
                              hint="the weights are corrupt or do not match the architecture")
    normed = torch.nn.functional.normalize(emb, dim=1)
    spread = float((normed - normed.mean(0)).norm(dim=1).mean())
    if float(emb.norm(dim=1).min()) < 1e-6 or spread < 1e-4:
        raise GateFailedError(f"the imported teacher gives (almost) the same embedding for every image (spread {spread:.2e})",
                              hint="the weights are untrained, zeroed, or do not match the architecture")
    cos = normed @ normed.T
    off_diagonal = cos[~torch.eye(len(cos), dtype=torch.bool)]
    return {"check_images": len(images), "embedding_spread": round(spread, 6),
            "mean_pair_cosine": round(float(off_diagonal.mean()), 6)}


def import_teacher(config: TeacherConfig, options: RunOptions) -> dict[str, Any]:
    from shrinkcli.engine.distributed import env_dist_info
    from shrinkcli.models.io import load_model, save_model_safetensors

    if not env_dist_info().is_main:
        return {"summary": {"imported": "on rank 0 only"}}  # under torchrun: one import, one run dir
    source = Path(config.load)
    if source.suffix.lower() == ".onnx":
        from shrinkcli.stages.teacher_onnx import import_onnx_teacher

        return import_onnx_teacher(config, options)
    model, meta = load_model(source, arch=config.arch if config.is_set("arch") else None)
    preprocess = dict(meta["preprocess"])
    images, described = _check_images(config, int(model.input_size), preprocess)
    check = check_embeddings(model, images)
    run_dir = options.create("teacher", config.to_dict())
    run_dir.add_input(source, "weights")
    weights = save_model_safetensors(model, run_dir.file("model.safetensors"), preprocess,
                                     extra={"imported_from": source.name, "imported_sha256": meta["sha256"]})
    run_dir.add_output(weights, "weights")
    params = sum(p.numel() for p in model.parameters())
    summary = {"run_dir": str(run_dir.path), "arch": meta["arch"], "arch_kwargs": str(meta["arch_kwargs"]),
               "params": params, "embedding_size": int(model.embedding_size), "input_size": int(model.input_size),
               "imported": str(source), "checked_on": described, **check, "weights": str(weights)}
    run_dir.set_results(**{k: v for k, v in summary.items() if k != "run_dir"})
    run_dir.finish()
    return {"run_dir": str(run_dir.path), "summary": summary}
