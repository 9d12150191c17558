"""What the ncnn, OpenVINO and TFLite exports share: extras, metadata beside the files, the gate.

Each runtime module (`ncnn`, `openvino`, `tflite` in this package) exposes
`write(model, spec, out_dir, *, onnx_graph, variants, calib) -> {variant: path}` and
`embed(path, inputs, threads) -> embeddings`, where `inputs` is what `spec.graph_input` returns:
the gate and `shrink verify` run the very file that ships, in its own runtime.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from shrinkcli.atomic import atomic_write_text
from shrinkcli.errors import BadInputError

RUNTIMES = ("ncnn", "openvino", "tflite")
# The import that proves the runtime is usable, and the extra that installs it.
_REQUIRES = {"ncnn": ("ncnn", "pnnx"), "openvino": ("openvino",), "tflite": ("ai_edge_litert",)}
_REQUIRES_TO_WRITE = {"openvino": ("openvino", "nncf"), "tflite": ("ai_edge_litert", "litert_torch")}
# The file each variant is written to, per runtime (ncnn's .bin sits beside its .param).
FILES = {
    "ncnn": {"fp32": "model.ncnn.param"},
    "openvino": {"fp32": "model.xml", "fp16": "model-fp16.xml", "int8": "model-int8.xml"},
    "tflite": {"fp32": "model.tflite", "int8": "model-int8.tflite"},
}
SUFFIX_RUNTIME = {".param": "ncnn", ".xml": "openvino", ".tflite": "tflite"}


def deployed_bytes(path: str | Path) -> int:
    """Bytes a device needs for this model: an ncnn .param or OpenVINO .xml counts its .bin too."""
    path = Path(path)
    runtime = SUFFIX_RUNTIME.get(path.suffix.lower())
    files = module(runtime).companion_files(path) if runtime in ("ncnn", "openvino") else [path]
    return sum(f.stat().st_size for f in files if f.exists())


def available(runtime: str, *, to_write: bool = False) -> bool:
    needed = (_REQUIRES_TO_WRITE if to_write else _REQUIRES).get(runtime, _REQUIRES[runtime])
    return all(importlib.util.find_spec(name) is not None for name in needed)


def require(runtime: str, *, to_write: bool = False) -> None:
    """One exit-2 line naming the pip command when the runtime's extra is not installed."""
    if not available(runtime, to_write=to_write):
        raise BadInputError(f"the {runtime} runtime is not installed",
                            hint=f'pip install "shrink[{runtime}]"')


def module(runtime: str):
    if runtime not in RUNTIMES:
        raise BadInputError(f"unknown runtime {runtime!r}", hint=f"use one of {', '.join(RUNTIMES)}")
    return importlib.import_module(f"shrinkcli.export.{runtime}")


def sidecar(path: str | Path) -> Path:
    """`model.xml` -> `model.xml.json`: shrink's metadata beside the runtime's own files."""
    return Path(str(path) + ".json")


def write_sidecar(path: Path, props: dict[str, str]) -> Path:
    return atomic_write_text(sidecar(path), json.dumps(props, indent=2, sort_keys=True) + "\n")


def read_sidecar(path: str | Path) -> dict[str, str]:
    side = sidecar(path)
    if not side.exists():
        return {}
    try:
        data = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{side} is not readable JSON ({exc})", hint="re-export the model") from exc
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def embed(path: str | Path, inputs: np.ndarray, *, threads: int = 1) -> np.ndarray:
    runtime = SUFFIX_RUNTIME.get(Path(path).suffix.lower())
    if runtime is None:
        raise BadInputError(f"{path}: not an ncnn, OpenVINO or TFLite model", hint="use .param, .xml or .tflite")
    require(runtime)
    return np.asarray(module(runtime).embed(Path(path), inputs, threads=threads), dtype=np.float32)


def gate(path: Path, variant: str, inputs: np.ndarray, reference: np.ndarray,
         min_cosine: float | None) -> dict[str, Any]:
    """Parity of the file at `path`, run in its runtime, against the torch embeddings `reference`."""
    from shrinkcli.evaluate.parity import gate as parity_gate

    return parity_gate(reference, embed(path, inputs), variant, min_cosine)


def variants_for(runtime: str, config) -> list[str]:
    """The variants `config` asks of `runtime`, without those the runtime has no maintained path for."""
    from shrinkcli import log

    wanted = ["fp32"] + (["fp16"] if config.dtype == "fp16" else []) + (["int8"] if config.quantize else [])
    kept = [v for v in wanted if v in FILES[runtime]]
    for variant in sorted(set(wanted) - set(kept)):
        why = ("the registry's ncnn package ships no ncnn2int8" if runtime == "ncnn" and variant == "int8"
               else f"{runtime} runs the fp32 file at reduced precision on the device itself")
        log.info(f"{runtime}: no {variant} file ({why})")
    return kept


def runtime_spec(runtime: str, spec):
    """ncnn and TFLite take float input: their own image APIs do the mean/std (docs/export.md)."""
    import dataclasses

    return spec if runtime == "openvino" else dataclasses.replace(spec, include_preprocess=False)


def write_runtime(runtime: str, model, spec, out_dir: Path, *, variants, calib_pixels: np.ndarray,
                  metadata: dict[str, str]) -> dict[str, Path]:
    """Write `variants` of `model` for `runtime` into `out_dir` with a metadata sidecar per file."""
    require(runtime, to_write=True)
    spec = runtime_spec(runtime, spec)
    calib = spec.graph_input(calib_pixels) if "int8" in variants else None
    written = module(runtime).write(model, spec, out_dir, variants=tuple(variants), calib=calib)
    from shrinkcli.export.onnx_export import build_metadata

    for variant, path in written.items():
        props = build_metadata(model, spec, dtype=variant, extra={**metadata, "runtime": runtime})
        write_sidecar(path, props)
    return written


def kind_of(runtime: str, variant: str) -> str:
    return runtime if variant == "fp32" else f"{runtime}-{variant}"
