"""Typed, validated configuration for every stage, TOML recipes and `key=value` overrides.

One flat dataclass per stage (teacher and distill share `TrainConfig`), so a recipe key, a CLI
option and a manifest entry all have the same name. Unknown keys and wrong types are refused
with the key and the place named.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from shrinkcli.errors import BadInputError


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`; strings from the command line are parsed."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except BadInputError as exc:
                errors.append(str(exc))
        raise BadInputError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise BadInputError(f"{where}: must be one of {', '.join(map(str, args))}, got {value!r}")
    if origin in (list, tuple):
        inner = args[0] if args else Any
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise BadInputError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise BadInputError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise BadInputError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise BadInputError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise BadInputError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise BadInputError(f"{where}: expected a string, got {value!r}")
    return value


def parse_overrides(overrides: list[str] | None) -> dict[str, str]:
    """`["epochs=3", "stage-weights=1,0,0,1"]` -> `{"epochs": "3", "stage_weights": "1,0,0,1"}` (not yet coerced)."""
    changes: dict[str, str] = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise BadInputError(f"override {item!r} is not key=value", hint="e.g. --set epochs=3")
        changes[key.strip().replace("-", "_")] = value.strip()
    return changes


@dataclass
class Config:
    """Base: construction from dicts with validation, overrides, and a plain-dict view."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config"):
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise BadInputError(f"{where}: unknown key(s) {', '.join(unknown)}",
                                hint=f"valid keys: {', '.join(sorted(names))}")
        values = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
        config = cls(**values)
        config.validate()
        return config

    def replace(self, where: str = "override", **changes: Any):
        merged = {**self.to_dict(), **{k: v for k, v in changes.items()}}
        return type(self).from_dict(merged, where)

    def apply_overrides(self, overrides: list[str] | None):
        """`["epochs=3", "stage_weights=1,0,0,1"]` -> a new validated config."""
        changes = parse_overrides(overrides)
        return self.replace("override", **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Cross-field checks; subclasses extend."""


AmpMode = Literal["auto", "bf16", "fp16", "off"]


@dataclass
class TrainConfig(Config):
    """Everything the shared training engine needs (teacher and distill extend it)."""

    data: Optional[str] = None          # training data spec (folder:, rec:, hf:, synthetic:)
    val: Optional[str] = None           # verification pairs spec for periodic validation
    input_size: int = 112
    crop: Optional[int] = None          # centre crop (pixels of the source image) before resize
    mean: float = 127.5
    std: float = 127.5
    flip: bool = True
    workers: int = 2
    skip_corrupt: bool = False
    epochs: int = 10
    batch_size: int = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "poly", "step", "constant"] = "cosine"
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    milestones: list[float] = field(default_factory=list)   # epochs, for the step schedule
    gamma: float = 0.1
    poly_power: float = 2.0
    clip_grad: Optional[float] = 5.0
    amp: AmpMode = "auto"               # bf16 on CUDA, off (fp32) on CPU
    channels_last: bool = True
    seed: int = 0
    device: str = "auto"
    save_every_steps: int = 0           # 0: only at epoch ends
    val_every_epochs: int = 1
    nan_policy: Literal["stop", "skip"] = "stop"
    max_nan_skips: int = 20
    log_every: int = 10
    max_steps: int = 0                  # stop after this many optimizer steps (0: no limit)

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
    arch: str = "r90"
    embedding_size: int = 512
    width: float = 1.0
    head: Literal["arcface", "cosface"] = "arcface"
    margin: Optional[float] = None      # default per head: arcface 0.5, cosface 0.35
    scale: float = 64.0
    sample_rate: float = 1.0            # PartialFC: fraction of class centres sampled per step
    load: Optional[str] = None          # import weights instead of training
    channel_order: Literal["RGB", "BGR"] = "RGB"   # what an imported ONNX graph without shrink metadata expects


@dataclass
class DistillConfig(TrainConfig):
    teacher: Optional[str] = None
    student: str = "mobilefacenet"
    embedding_size: int = 512
    width: float = 1.0
    embed_loss: Literal["angular", "cosine", "l2", "none"] = "angular"
    stage_loss: Literal["angular", "cosine", "l2", "none"] = "angular"
    embed_weight: float = 1.0
    stage_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    labels: bool = True                 # add the margin loss on identity labels
    head: Literal["arcface", "cosface"] = "arcface"
    margin: Optional[float] = None
    scale: float = 64.0
    sample_rate: float = 1.0
    cache_teacher: bool = False
    cache_stages: bool = False          # also cache the four stage maps when caching
    cache_dtype: Literal["float16", "float32"] = "float16"   # stage maps on disk: half the size, or exact
    cache_dir: Optional[str] = None     # where the teacher cache lives (default: <run dir>/teacher_cache)
    compile_teacher: Literal["auto", "on", "off"] = "auto"   # torch.compile the frozen teacher: auto (on CUDA, off on CPU), on or off
    # Objectives beyond ShrinkTeaNet (docs/losses.md): fixed teacher-space class centres for the
    # margin head (ProxylessKD), similarity-preserving KD and evaluation-oriented rank KD (EKD).
    head_centres: Literal["learned", "teacher", "teacher-classifier", "teacher-mean"] = "learned"
    similarity_weight: float = 0.0      # SP on the batch cosine matrix (0: off; 3000 is the SP paper's)
    ekd_weight: float = 0.0             # EKD rank loss on critical pairs (0: off; 1: the authors' weighting)
    ekd_fprs: list[float] = field(default_factory=lambda: [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
    ekd_topk: int = 2000                # hardest negative pairs (by student similarity) per batch
    ekd_temperature: float = 0.01       # sigmoid temperature of the soft rank

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
    format: Literal["onnx", "safetensors", "ncnn", "openvino", "tflite", "all"] = "onnx"
    opset: int = 18
    dtype: Literal["fp32", "fp16"] = "fp32"
    quantize: Optional[Literal["int8"]] = None
    calib_data: Optional[str] = None
    calib_images: int = 64
    include_preprocess: bool = False
    preprocess_layout: Literal["nchw", "nhwc"] = "nhwc"
    normalize_output: bool = False
    prelu: Literal["split", "residual", "native"] = "split"   # split/residual: fast in onnxruntime fp32/int8; native: one PRelu op
    check: bool = True
    check_data: Optional[str] = None
    check_images: int = 32              # images for the parity check (from check_data/calib_data or generated)
    min_cosine: Optional[float] = None


@dataclass
class VerifyConfig(Config):
    model: Optional[str] = None
    reference: Optional[str] = None
    teacher: Optional[str] = None
    data: Optional[str] = None          # labelled images (a data spec) or a feature store of the model (shrink embed)
    pairs: Optional[str] = None
    input_size: Optional[int] = None
    crop: Optional[int] = None
    folds: int = 10
    min_cosine: Optional[float] = None
    max_abs_diff: Optional[float] = None
    min_accuracy: Optional[float] = None
    max_gap: Optional[float] = None
    parity_images: int = 64
    batch_size: int = 64
    distractors: Optional[str] = None   # images without identity (a data spec) or a feature store of the model
    ijb: Optional[str] = None            # IJB-B/C root: meta files + images/ (1:1 template verification)
    megaface: bool = False              # MegaFace rank-1 of --data probes against `distractors`
    identification: bool = True         # rank-1 on --data when it is a labelled set
    latency_seconds: float = 1.0        # time budget per latency measurement (0: skip)
    flip: bool = True                   # add the horizontally flipped image's embedding


@dataclass
class EmbedConfig(Config):
    model: Optional[str] = None         # .onnx, .safetensors, .pt or a run dir (as verify --model)
    data: Optional[str] = None          # labelled data spec whose every image is embedded
    out: Optional[str] = None           # store folder: store.json + features.npy + labels.npy
    dtype: Literal["float16", "float32"] = "float16"   # stored feature type: half the disk, or exact
    chunk_size: int = 4096              # images per chunk: the unit of resume after a kill
    batch_size: int = 64                # images per forward
    crop: Optional[int] = None          # centre crop before resize (default: the model's recorded crop)
    flip: bool = True                   # add the horizontally flipped image's embedding (as verify)
    overwrite: bool = False             # replace a store made from another model, data or settings

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
    return cls.from_dict({**common, **recipe.get(stage, {})}, f"{where}[{stage}]")
