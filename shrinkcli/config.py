"""Typed, validated configuration for every stage, TOML recipes and `key=value` overrides.

One flat dataclass per stage (teacher and distill share `TrainConfig`), so a recipe key, a CLI
option and a manifest entry all have the same name. Unknown keys and wrong types are refused
with the key and the place named.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from shrinkcli.errors import BadInputError
from shrinkcli.fields import check_bounds, coerce, opt, parse_overrides


class _RecordsKeywords(type):
    """Keyword arguments given to a config's constructor in Python count as set by "python"."""

    def __call__(cls, *args: Any, **kwargs: Any):
        config = super().__call__(*args, **kwargs)
        config._sources = {name: "python" for name in kwargs}
        return config


@dataclass
class Config(metaclass=_RecordsKeywords):
    """Base: construction from dicts with validation, overrides, and a plain-dict view.

    A config remembers which fields were set and by whom (`sources`: field -> "recipe",
    "option", "--set", "resume", "teacher", "pipeline", ...). Code that must know whether the
    user chose a value asks `is_set`, never whether the value happens to equal the default.
    """

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config", *, source: str | None = None,
                  sources: dict[str, str] | None = None):
        """Validated config from `data`; every key in `data` counts as set by `source` (default
        `where`), unless `sources` gives the provenance of each field explicitly."""
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise BadInputError(f"{where}: unknown key(s) {', '.join(unknown)}",
                                hint=f"valid keys: {', '.join(sorted(names))}")
        values = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
        for f in dataclasses.fields(cls):
            if f.name in values:
                check_bounds(f.name, values[f.name], f.metadata.get("bounds") or {}, where)
        config = cls(**values)
        config._sources = dict(sources) if sources is not None else {k: source or where for k in data}
        config.validate()
        return config

    def replace(self, where: str = "override", *, source: str | None = None, **changes: Any):
        """A new validated config with `changes` applied and recorded as set by `source`."""
        merged = {**self.to_dict(), **changes}
        sources = {**self._sources, **{k: source or where for k in changes}}
        return type(self).from_dict(merged, where, sources=sources)

    def apply_overrides(self, overrides: list[str] | None):
        """`["epochs=3", "stage_weights=1,0,0,1"]` -> a new validated config."""
        changes = parse_overrides(overrides)
        return self.replace("override", source="--set", **changes) if changes else self

    def is_set(self, name: str) -> bool:
        """Whether `name` was given by someone (recipe, option, --set, ...) rather than defaulted."""
        return name in self._sources

    def source(self, name: str) -> str | None:
        return self._sources.get(name)

    @property
    def sources(self) -> dict[str, str]:
        return dict(self._sources)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Cross-field checks; subclasses extend."""


AmpMode = Literal["auto", "bf16", "fp16", "off"]


@dataclass
class TrainConfig(Config):
    """Everything the shared training engine needs (teacher and distill extend it)."""

    data: Optional[str] = opt(None, help='Training data: folder:PATH, rec:PATH/train.rec, hf:PATH_OR_NAME, synthetic[:N], or a path (auto-detected).')
    val: Optional[str] = opt(None, help='Validation pairs: a .bin pack, lfw:ROOT (pairs.txt), or pairs built from a labelled set.')
    input_size: int = opt(112, gt=0, le=1024, help='Input side in pixels (a multiple of 16).')
    crop: Optional[int] = opt(None, gt=0, le=4096, help='Centre crop (pixels of the source image) before the resize.')
    mean: float = opt(127.5, ge=0, le=255, help='Pixel mean subtracted before dividing by std.')
    std: float = opt(127.5, gt=0, le=1e4, help='Pixel std: the network sees (pixel - mean) / std.')
    flip: bool = opt(True, help='Random horizontal flip of training images.')
    workers: int = opt(2, ge=0, le=256, help='DataLoader worker processes (0: load in the training process).')
    skip_corrupt: bool = opt(False, help='Skip images that fail to decode instead of stopping.')
    epochs: int = opt(10, gt=0, le=1e6, help='Training epochs.')
    batch_size: int = opt(128, gt=0, le=1 << 20, help='Images per optimizer step over all processes (the global batch).')
    optimizer: Literal["sgd", "adamw"] = opt("sgd", help='sgd or adamw.')
    lr: float = opt(0.1, help='Peak learning rate (after warm-up).')
    momentum: float = opt(0.9, ge=0, lt=1, help='SGD momentum.')
    weight_decay: float = opt(5e-4, ge=0, help='Weight decay of conv/linear weights and class centres.')
    schedule: Literal["cosine", "poly", "step", "constant"] = opt("cosine", help='Learning-rate schedule after warm-up: cosine, poly, step or constant.')
    warmup_epochs: float = opt(1.0, ge=0, help='Linear warm-up length in epochs.')
    min_lr: float = opt(0.0, ge=0, help='Learning rate at the end of the cosine/poly schedule.')
    milestones: list[float] = opt(factory=list, ge=0, help='Epochs at which the step schedule multiplies the lr by gamma.')
    gamma: float = opt(0.1, gt=0, help='Step-schedule factor.')
    poly_power: float = opt(2.0, gt=0, help='Exponent of the poly schedule.')
    clip_grad: Optional[float] = opt(5.0, gt=0, help='Clip the gradient norm to this value (none: no clipping).')
    head_update: Literal["sparse", "dense"] = opt("sparse", help='With sample_rate < 1: update only the sampled centres and their momentum (sparse, the PartialFC paper) or every row (dense).')
    amp: AmpMode = opt("auto", help='Mixed precision: auto (bf16 on CUDA, off on CPU), bf16, fp16 or off.')
    channels_last: bool = opt(True, help='Run convolutions in channels_last memory format.')
    seed: int = opt(0, ge=0, le=2**32 - 1, help='Random seed of weights, sampling and flips.')
    device: str = opt("auto", help='auto, cpu, cuda or cuda:N.')
    save_every_steps: int = opt(0, ge=0, help='Also write weights/last.pt every N steps (0: only at epoch ends).')
    val_every_epochs: int = opt(1, gt=0, help='Validate every N epochs (and after the last).')
    nan_policy: Literal["stop", "skip"] = opt("stop", help='On a non-finite loss/gradient: stop, or skip the step.')
    max_nan_skips: int = opt(20, ge=0, help='With nan_policy=skip: stop after this many skipped steps.')
    log_every: int = opt(10, gt=0, help='Log a metrics line every N steps.')
    max_steps: int = opt(0, ge=0, help='Stop after this many optimizer steps (0: no limit).')

    def validate(self) -> None:
        super().validate()
        if self.input_size <= 0 or self.input_size % 16:
            raise BadInputError(f"input_size={self.input_size} must be a positive multiple of 16")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) <= 0:
                raise BadInputError(f"{key}={getattr(self, key)} must be > 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BadInputError(f"lr={self.lr} must be a finite number > 0")
        if self.std == 0:
            raise BadInputError("std must not be 0")


@dataclass
class TeacherConfig(TrainConfig):
    arch: str = opt("r90", help='Teacher architecture (see `shrink models`), e.g. r90, r50, r18; with --load, checked against the weights.')
    embedding_size: int = opt(512, gt=0, le=65536, help='Embedding dimension.')
    width: float = opt(1.0, gt=0, le=16, help='Channel width multiplier.')
    head: Literal["arcface", "cosface"] = opt("arcface", help='Margin head: arcface or cosface.')
    margin: Optional[float] = opt(None, ge=0, lt=3.1416, help='Margin of the head (none: 0.5 for arcface, 0.35 for cosface).')
    scale: float = opt(64.0, gt=0, help='Logit scale s of the margin head.')
    sample_rate: float = opt(1.0, gt=0, le=1, help='PartialFC: fraction of class centres scored per step.')
    load: Optional[str] = opt(None, help='Import weights instead of training: insightface backbone.pth, .onnx, .pt, .safetensors or a checkpoint.')
    channel_order: Literal["RGB", "BGR"] = opt("RGB", help='What an imported ONNX graph without shrink metadata expects.')


@dataclass
class DistillConfig(TrainConfig):
    teacher: Optional[str] = opt(None, help='Teacher: a teacher run dir, a checkpoint, a .onnx, or an insightface backbone.pth.')
    student: str = opt("mobilefacenet", help='Student architecture: mobilefacenet, mobilenetv1, mobilenetv2, mfnr (see `shrink models`).')
    embedding_size: int = opt(512, gt=0, le=65536, help='Embedding dimension.')
    width: float = opt(1.0, gt=0, le=16, help='Channel width multiplier.')
    embed_loss: Literal["angular", "cosine", "l2", "none"] = opt("angular", help='Loss on the embedding: angular ((1-cos)^2, paper Eq. 4), cosine, l2 or none.')
    stage_loss: Literal["angular", "cosine", "l2", "none"] = opt("angular", help='Loss on the four stage outputs: angular, cosine, l2 or none.')
    embed_weight: float = opt(1.0, ge=0, help='Weight of the embedding distillation term.')
    stage_weights: list[float] = opt(factory=lambda: [1.0, 1.0, 1.0, 1.0], ge=0, help='Four comma-separated weights of the stage terms, e.g. 1,1,1,1.')
    labels: bool = opt(True, help='Add the margin loss on identity labels, or learn from the teacher alone.')
    head: Literal["arcface", "cosface"] = opt("arcface", help='Margin head: arcface or cosface.')
    margin: Optional[float] = opt(None, ge=0, lt=3.1416, help='Margin of the head (none: 0.5 for arcface, 0.35 for cosface).')
    scale: float = opt(64.0, gt=0, help='Logit scale s of the margin head.')
    sample_rate: float = opt(1.0, gt=0, le=1, help='PartialFC: fraction of class centres scored per step.')
    cache_teacher: bool = opt(False, help='Compute teacher outputs once and reuse them across epochs.')
    cache_stages: bool = opt(False, help='Also cache the four stage maps when caching.')
    cache_dtype: Literal["float16", "float32"] = opt("float16", help='Stage maps on disk: half the size, or exact.')
    cache_dir: Optional[str] = opt(None, help='Where the teacher cache lives (default: <run dir>/teacher_cache).')
    allow_incomplete: bool = opt(False, help='Accept input run dirs whose run did not complete (failed, interrupted).')
    compile_teacher: Literal["auto", "on", "off"] = opt("auto", help='torch.compile the frozen teacher: auto (on CUDA, off on CPU), on or off.')
    # Objectives beyond ShrinkTeaNet (docs/losses.md): fixed teacher-space class centres for the
    # margin head (ProxylessKD), similarity-preserving KD and evaluation-oriented rank KD (EKD).
    head_centres: Literal["learned", "teacher", "teacher-classifier", "teacher-mean"] = opt("learned", help="Class centres of the student's margin head: learned, or fixed from the teacher (teacher, teacher-classifier, teacher-mean).")
    similarity_weight: float = opt(0.0, ge=0, help="SP on the batch cosine matrix (0: off; 3000 is the SP paper's).")
    ekd_weight: float = opt(0.0, ge=0, help="EKD rank loss on critical pairs (0: off; 1: the authors' weighting).")
    ekd_fprs: list[float] = opt(factory=lambda: [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6], gt=0, lt=1, help="False-positive rates whose thresholds define EKD's critical pairs.")
    ekd_topk: int = opt(2000, gt=0, help='Hardest negative pairs (by student similarity) per batch.')
    ekd_temperature: float = opt(0.01, gt=0, help='Sigmoid temperature of the soft rank.')

    def validate(self) -> None:
        super().validate()
        if len(self.stage_weights) != 4:
            raise BadInputError(f"stage_weights needs 4 values, got {len(self.stage_weights)}",
                                hint="e.g. --stage-weights 1,1,1,1")
        relational = bool(self.similarity_weight) or bool(self.ekd_weight)
        if (not self.labels and self.embed_loss == "none" and (self.stage_loss == "none" or not any(self.stage_weights))
                and not relational):
            raise BadInputError("nothing to learn: --no-labels with every distillation loss off")
        if self.head_centres != "learned" and not self.labels:
            raise BadInputError(f"head_centres={self.head_centres} needs identity labels (it is a margin loss)",
                                hint="drop --no-labels, or use head_centres=learned")
        if self.similarity_weight < 0 or self.ekd_weight < 0:
            raise BadInputError("similarity_weight and ekd_weight must be >= 0")


@dataclass
class ExportConfig(Config):
    run: Optional[str] = opt(None, help="A distill (or teacher) run dir to export (default: the newest completed distill run).")
    weights: Optional[str] = opt(None, help="A weights file to export (.safetensors, .pt, .pth).")
    format: Literal["onnx", "safetensors", "ncnn", "openvino", "tflite", "all"] = opt("onnx", help='Artifacts to write: onnx, safetensors, ncnn, openvino, tflite, or all.')
    opset: int = opt(18, ge=17, help='ONNX opset.')
    dtype: Literal["fp32", "fp16"] = opt("fp32", help='fp32 or fp16 (ONNX).')
    quantize: Optional[Literal["int8"]] = opt(None, help='int8: onnxruntime quantization (static with --calib-data).')
    calib_data: Optional[str] = opt(None, help='Images for int8 calibration (a data spec).')
    calib_images: int = opt(64, gt=0, le=100000, help='Calibration images used for int8.')
    include_preprocess: bool = opt(False, help='Accept uint8 images and normalise inside the graph.')
    preprocess_layout: Literal["nchw", "nhwc"] = opt("nhwc", help='Input layout with --include-preprocess: nhwc or nchw.')
    normalize_output: bool = opt(False, help='L2-normalise the output embedding.')
    prelu: Literal["split", "residual", "native"] = opt("split", help='Split/residual: fast in onnxruntime fp32/int8; native: one PRelu op.')
    check: bool = opt(True, help='Parity check against the fp32 torch model (fails the command when it fails).')
    check_data: Optional[str] = opt(None, help='Real images for the parity check (a data spec).')
    check_images: int = opt(32, gt=0, le=100000, help='Images for the parity check (from check_data/calib_data or generated).')
    min_cosine: Optional[float] = opt(None, ge=-1, help='Parity gate on the minimum per-image cosine (default 0.99999 fp32, 0.999 fp16, 0.98 int8).')
    allow_incomplete: bool = opt(False, help='Accept input run dirs whose run did not complete (failed, interrupted).')

    def validate(self) -> None:
        super().validate()
        try:
            import onnx
        except ImportError:         # the export itself says that onnx is missing
            return
        newest = onnx.defs.onnx_opset_version()
        if self.opset > newest:
            # the converter would fall back to another opset and the manifest would record this one
            raise BadInputError(f"opset={self.opset} is newer than the installed onnx supports ({newest})",
                                hint=f"use --set opset=17..{newest}")


@dataclass
class VerifyConfig(Config):
    model: Optional[str] = opt(None, help='Artifact to check: .onnx, .safetensors, .pt, or a run dir.')
    reference: Optional[str] = opt(None, help='Reference for the parity check (e.g. the torch weights the ONNX came from).')
    teacher: Optional[str] = opt(None, help='Teacher to compare accuracy with (enables --max-gap).')
    data: Optional[str] = opt(None, help='Images for parity and identification (a data spec), or a feature store of the model (shrink embed).')
    pairs: Optional[str] = opt(None, help='Verification pairs: .bin pack, lfw:ROOT, a pairs.txt with --data, or pairs:N to build from --data.')
    input_size: Optional[int] = opt(None, gt=0, le=1024, help="Input side (default: the model's recorded one).")
    crop: Optional[int] = opt(None, gt=0, le=4096, help="Centre crop before resize (default: the model's recorded one).")
    folds: int = opt(10, ge=2, le=1000, help='Cross-validation folds of the verification accuracy.')
    min_cosine: Optional[float] = opt(None, ge=-1, help='Parity gate on the minimum per-image cosine (default 0.99999 fp32, 0.999 fp16, 0.98 int8).')
    max_abs_diff: Optional[float] = opt(None, ge=0, help='Parity gate on the largest element difference.')
    min_accuracy: Optional[float] = opt(None, ge=0, le=1, help='Gate on verification accuracy (0..1).')
    max_gap: Optional[float] = opt(None, ge=-1, le=1, help='Gate on teacher minus student accuracy (0..1).')
    parity_images: int = opt(64, gt=0, le=100000, help='Images for the parity check.')
    batch_size: int = opt(64, gt=0, le=1 << 16, help='Images per forward.')
    distractors: Optional[str] = opt(None, help='Images without identity (a data spec) or a feature store of the model.')
    ijb: Optional[str] = opt(None, help='IJB-B/C root: meta files + images/ (1:1 template verification).')
    megaface: bool = opt(False, help='MegaFace rank-1 of --data probes against `distractors`.')
    identification: bool = opt(True, help='Rank-1 on --data when it is a labelled set.')
    latency_seconds: float = opt(1.0, ge=0, le=3600, help='Time budget per latency measurement (0: skip).')
    flip: bool = opt(True, help="Add the horizontally flipped image's embedding (the insightface protocol).")
    allow_incomplete: bool = opt(False, help='Accept input run dirs whose run did not complete (failed, interrupted).')


@dataclass
class EmbedConfig(Config):
    model: Optional[str] = opt(None, help='Model to embed with: .onnx, .safetensors, .pt, or a run dir (as verify --model).')
    data: Optional[str] = opt(None, help='Labelled images to embed (a data spec), e.g. MegaFace distractors.')
    out: Optional[str] = opt(None, help='Store folder: store.json + features.npy + labels.npy.')
    dtype: Literal["float16", "float32"] = opt("float16", help='Stored feature type: half the disk, or exact.')
    chunk_size: int = opt(4096, gt=0, le=1 << 22, help='Images per chunk: the unit of resume after a kill.')
    batch_size: int = opt(64, gt=0, le=1 << 16, help='Images per forward.')
    crop: Optional[int] = opt(None, gt=0, le=4096, help="Centre crop before resize (default: the model's recorded crop).")
    flip: bool = opt(True, help="Add the horizontally flipped image's embedding (the insightface protocol).")
    overwrite: bool = opt(False, help='Replace a store made from another model, data or settings.')
    allow_incomplete: bool = opt(False, help='Accept input run dirs whose run did not complete (failed, interrupted).')

    def validate(self) -> None:
        super().validate()
        for key in ("chunk_size", "batch_size"):
            if getattr(self, key) <= 0:
                raise BadInputError(f"{key}={getattr(self, key)} must be > 0")


STAGE_CONFIGS: dict[str, type[Config]] = {
    "teacher": TeacherConfig,
    "distill": DistillConfig,
    "export": ExportConfig,
    "verify": VerifyConfig,
    "embed": EmbedConfig,
}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Parse a TOML recipe: top-level `[teacher]`, `[distill]`, `[export]`, `[verify]` tables
    plus an optional `[common]` table whose keys apply to every stage that has them."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"recipe {path} does not exist", hint="see recipes/ for examples")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"recipe {path} is not valid TOML: {exc}") from exc
    allowed = set(STAGE_CONFIGS) | {"common", "recipe", "pipeline", "experiment"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadInputError(f"recipe {path}: unknown table(s) {', '.join(unknown)}",
                            hint=f"valid tables: {', '.join(sorted(allowed))}")
    for key, value in data.items():
        if not isinstance(value, dict):
            raise BadInputError(f"recipe {path}: '{key}' must be a table, got {type(value).__name__}")
    return data


def stage_config_from_recipe(recipe: dict[str, Any], stage: str, where: str = "recipe"):
    """The validated config of `stage`: its table over the `[common]` keys it knows."""
    cls = STAGE_CONFIGS[stage]
    names = {f.name for f in dataclasses.fields(cls)}
    common = {k: v for k, v in recipe.get("common", {}).items() if k in names}
    return cls.from_dict({**common, **recipe.get(stage, {})}, f"{where}[{stage}]", source="recipe")
