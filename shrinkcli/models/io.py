"""Reading and writing model weights: our .safetensors, our .pt checkpoints, insightface backbone.pth.

Pickle-based files are only ever read with `torch.load(weights_only=True)`: a file that needs
arbitrary code to unpickle is refused, never executed. Architectures are taken from our metadata
when present, otherwise inferred from the state_dict's key names and tensor shapes alone.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrinkcli import __version__
from shrinkcli.atomic import atomic_write_bytes, sha256_file
from shrinkcli.errors import BadInputError
from shrinkcli.models.registry import create_model

WRAPPER_KEYS = ("model", "state_dict", "backbone")
DEFAULT_MEAN = 127.5
DEFAULT_STD = 127.5


def model_preprocess_default(arch: str | None = None, input_size: int = 112) -> dict:
    """(x - 127.5) / 127.5 on RGB, as insightface trains every model in the zoo."""
    return {"mean": DEFAULT_MEAN, "std": DEFAULT_STD, "crop": None, "input_size": input_size, "channel_order": "RGB"}


# ---------------------------------------------------------------------------------------- reading

def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only reports both refused objects ("Unsupported global: GLOBAL posix.system")
        # and plain garbage ("Unsupported operand 110") as UnpicklingError: tell them apart.
        if "global" not in str(exc).lower():
            raise BadInputError(f"cannot read weights from {path}: not a PyTorch checkpoint (corrupt or wrong format)",
                                hint="expected a .pt/.pth state_dict or checkpoint, or a .safetensors file") from exc
        raise BadInputError(
            f"{path} refused: it contains pickled objects other than tensors (unsafe to load)",
            hint="re-save it as a plain state_dict (torch.save(model.state_dict(), ...)) or as .safetensors",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a truncated zip, wrong format, ...: all bad input
        raise BadInputError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}",
                            hint="expected a .pt/.pth state_dict or checkpoint, or a .safetensors file") from exc


def _read_file(path: str | Path) -> tuple[Any, dict[str, str]]:
    """The raw object in `path` and, for .safetensors, its string metadata."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"weights file {path} does not exist", hint="check the path or pass a run dir")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise BadInputError(f"cannot read {path}: {exc}", hint="the file is truncated or not safetensors") from exc
        return tensors, metadata
    return _torch_load(path), {}


def _unwrap_state_dict(obj: Any, path: Path | str) -> dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {"state_dict": {"model": {...}}}
        if isinstance(obj, dict) and not _is_tensor_dict(obj):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj or not _is_tensor_dict(obj):
        raise BadInputError(f"{path} holds no model state_dict",
                            hint=f"expected a dict of tensors, possibly under one of {', '.join(WRAPPER_KEYS)}")
    return {_strip_prefix(k): v for k, v in obj.items()}


def _is_tensor_dict(obj: dict) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefix(key: str) -> str:
    # DataParallel/DDP wrap the model as `module`; torch.compile as `_orig_mod`.
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pt/.pth (state_dict or checkpoint) or .safetensors file, 'module.' stripped."""
    obj, _ = _read_file(path)
    return _unwrap_state_dict(obj, path)


# ------------------------------------------------------------------------------------ inference

def _block_counts(state_dict: dict[str, torch.Tensor]) -> list[int]:
    counts = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in state_dict if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        counts.append(len(indices))
    return counts


def _infer_iresnet(sd: dict[str, torch.Tensor]) -> tuple[str, dict]:
    from shrinkcli.models.iresnet import IRESNET_LAYOUTS

    blocks = _block_counts(sd)
    name = next((n for n, layout in IRESNET_LAYOUTS.items() if layout == blocks), None)
    if name is None:
        known = ", ".join(f"{n} {layout}" for n, layout in IRESNET_LAYOUTS.items())
        raise BadInputError(f"IResNet with {blocks} blocks per stage is not a known depth",
                            hint=f"known layouts: {known}")
    last_channels = sd["layer4.0.conv2.weight"].shape[0]
    embedding_size, fc_in = sd["fc.weight"].shape
    side = math.isqrt(fc_in // last_channels)
    if side * side * last_channels != fc_in:
        raise BadInputError(f"IResNet fc input {fc_in} is not {last_channels} x a square map")
    return name, {"embedding_size": int(embedding_size), "input_size": 16 * side,
                  "width_candidates": [last_channels / 512, sd["conv1.weight"].shape[0] / 64]}


def _infer_student(sd: dict[str, torch.Tensor]) -> tuple[str, dict]:
    stem = sd["stage1.0.0.weight"].shape[0]
    head_channels = sd["head.linear.weight"].shape[1]
    if "stage1.1.conv.0.0.weight" in sd:
        name, widths = "mobilenetv2", [sd["neck.0.weight"].shape[1] / 320, stem / 32]
    elif "stage1.1.0.0.weight" in sd:
        name, widths = "mobilenetv1", [head_channels / 1024, stem / 32]
    elif "stage1.1.0.weight" in sd:
        name = "mfnr" if any(".shortcut." in k for k in sd) else "mobilefacenet"
        if name == "mobilefacenet" and "stage1.0.2.weight" not in sd:   # no PReLU slopes: the ReLU variant
            name = "mobilefacenet-relu"
        widths = [head_channels / 512, stem / 64]
    else:
        raise BadInputError("state_dict looks like a shrink student but matches no known student layout")
    return name, {"embedding_size": int(sd["head.linear.weight"].shape[0]),
                  "input_size": 16 * int(sd["head.gdc.0.weight"].shape[-1]), "width_candidates": widths}


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def infer_arch(state_dict: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """(registry name, create_model kwargs) from key names and shapes alone."""
    sd = {_strip_prefix(k): v for k, v in state_dict.items()}
    if "conv1.weight" in sd and "fc.weight" in sd and "layer4.0.conv2.weight" in sd:
        name, guess = _infer_iresnet(sd)
    elif "stage1.0.0.weight" in sd and "head.gdc.0.weight" in sd and "head.linear.weight" in sd:
        name, guess = _infer_student(sd)
    else:
        sample = ", ".join(list(sd)[:4])
        raise BadInputError(f"unknown model layout (first keys: {sample})",
                            hint="supported: insightface IResNet backbones and shrink models; pass --arch to force one")
    expected = _shapes(sd)
    raw_widths = guess.pop("width_candidates")
    # Prefer the round multiplier a user would have typed (0.3) over the exact ratio (0.300781).
    for width in dict.fromkeys([round(w, 2) for w in raw_widths] + [round(w, 6) for w in raw_widths]):
        kwargs = {**guess, "width": width}
        with torch.device("meta"):
            candidate = create_model(name, **kwargs)
        if _shapes(candidate.state_dict()) == expected:
            return name, kwargs
    raise BadInputError(f"weights look like {name} but no width multiplier reproduces their shapes",
                        hint="pass --arch and matching options explicitly")


# ------------------------------------------------------------------------------------ writing

def save_model_safetensors(model: nn.Module, path: str | Path, preprocess: dict | None = None,
                           extra: dict | None = None) -> Path:
    """Weights plus everything needed to rebuild the model, as safetensors string metadata."""
    from safetensors.torch import save

    arch = getattr(model, "arch", None)
    if arch is None:
        raise BadInputError("cannot save a model without `arch` (build it with create_model)")
    preprocess = preprocess or model_preprocess_default(arch, model.input_size)
    metadata = {
        "shrink_arch": arch,
        "shrink_arch_kwargs": json.dumps(dict(getattr(model, "arch_kwargs", {}) or {}), sort_keys=True),
        "embedding_size": str(model.embedding_size),
        "input_size": str(model.input_size),
        "preprocess": json.dumps(preprocess, sort_keys=True),
        "shrink_version": __version__,
    }
    for key, value in (extra or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    # safetensors needs dense, contiguous, unshared tensors; channels_last weights are not contiguous.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


# ------------------------------------------------------------------------------------ loading

def _json_field(metadata: dict, key: str, path: Path) -> Any:
    try:
        return json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path}: metadata field {key!r} is missing or not JSON") from exc


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and not isinstance(value, bool) else None


def check_preprocess(preprocess: Any, path: Path | str) -> dict | None:
    """The preprocessing a file records, refused with one line when it cannot be what it says
    (e.g. mean = "x"): every embedding computed from it would be wrong or a crash."""
    if preprocess is None:
        return None
    if not isinstance(preprocess, dict):
        raise BadInputError(f"{path}: recorded preprocessing is not a table: {str(preprocess)[:80]!r}",
                            hint="re-save the weights with shrink, or pass a file without shrink metadata")
    for key in ("mean", "std"):
        if key in preprocess and _number(preprocess[key]) is None:
            raise BadInputError(f"{path}: recorded preprocessing {key} = {preprocess[key]!r} is not a finite number",
                                hint="re-save the weights with shrink")
    if "std" in preprocess and _number(preprocess["std"]) == 0:
        raise BadInputError(f"{path}: recorded preprocessing std is 0", hint="re-save the weights with shrink")
    for key in ("input_size", "crop"):
        value = preprocess.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise BadInputError(f"{path}: recorded preprocessing {key} = {value!r} is not a positive integer",
                                hint="re-save the weights with shrink")
    if "channel_order" in preprocess and str(preprocess["channel_order"]).upper() not in ("RGB", "BGR"):
        raise BadInputError(f"{path}: recorded channel_order = {preprocess['channel_order']!r} is not RGB or BGR")
    return preprocess


def _arch_from_file(obj: Any, metadata: dict, path: Path) -> tuple[str | None, dict, dict | None]:
    """(arch, kwargs, preprocess) recorded in the file itself, or (None, {}, None)."""
    if "shrink_arch" in metadata:
        preprocess = _json_field(metadata, "preprocess", path) if "preprocess" in metadata else None
        kwargs = _json_field(metadata, "shrink_arch_kwargs", path)
        if not isinstance(kwargs, dict):
            raise BadInputError(f"{path}: metadata field 'shrink_arch_kwargs' is not a table")
        return metadata["shrink_arch"], kwargs, check_preprocess(preprocess, path)
    if isinstance(obj, dict) and isinstance(obj.get("arch"), str):
        kwargs = obj.get("arch_kwargs") if isinstance(obj.get("arch_kwargs"), dict) else {}
        preprocess = obj.get("preprocess") if isinstance(obj.get("preprocess"), dict) else None
        return obj["arch"], dict(kwargs), check_preprocess(preprocess, path)
    return None, {}, None


def load_model(path: str | Path, arch: str | None = None, **kwargs: Any) -> tuple[nn.Module, dict]:
    """Model in eval mode plus meta {arch, arch_kwargs, preprocess, sha256, path, metadata}.

    `arch`/`kwargs` override what the file records or what is inferred from its shapes."""
    path = Path(path)
    obj, metadata = _read_file(path)
    state_dict = _unwrap_state_dict(obj, path)
    file_arch, file_kwargs, preprocess = _arch_from_file(obj, metadata, path)
    if arch is None and file_arch is None:
        file_arch, file_kwargs = infer_arch(state_dict)
    elif arch is not None and arch != file_arch:
        file_kwargs = {}
        try:
            inferred_arch, inferred_kwargs = infer_arch(state_dict)
            if inferred_arch == arch:
                file_kwargs = inferred_kwargs
        except BadInputError:
            pass
    name = arch or file_arch
    model_kwargs = {**file_kwargs, **kwargs}
    try:
        model = create_model(name, **model_kwargs)
    except (TypeError, ValueError) as exc:      # kwargs recorded in the file (or given) that do not fit
        raise BadInputError(f"{path}: cannot build {name} with {model_kwargs}: {_first_line(exc)}",
                            hint="check --arch and its options, or re-save the weights with shrink") from exc
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        missing, unexpected = _key_diff(model.state_dict(), state_dict)
        raise BadInputError(
            f"{path} does not fit {name} {model_kwargs}: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); {_first_line(exc)}",
            hint="check --arch and its options, or omit --arch to infer it from the file",
        ) from exc
    model.eval()
    meta = {
        "arch": name,
        "arch_kwargs": dict(model.arch_kwargs),
        "preprocess": preprocess or model_preprocess_default(name, model.input_size),
        "sha256": sha256_file(path),
        "path": str(path),
        "metadata": metadata,
    }
    return model, meta


def _key_diff(expected: dict, given: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(given)), sorted(set(given) - set(expected))


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    shape_line = next((ln for ln in lines if "size mismatch" in ln), None)
    return shape_line or (lines[0] if lines else type(exc).__name__)
