"""OpenVINO: IR `.xml` + `.bin` from the exported ONNX graph, int8 through NNCF.

fp32 is saved with fp32 weights (OpenVINO's own default would compress them to fp16), fp16 with
compressed weights. int8 is NNCF post-training quantisation on the calibration images with its
overflow fix on every layer: x86 CPUs without VNNI sum u8 x s8 products in 16 bits, and on such a
CPU the tiny test student fell from min cosine 0.918 to 0.725 with the fix on the first layer only.
As in ONNX int8 (shrinkcli.export.quantize), the first convolution and the last two weighted layers
(the embedding head) stay fp32: on that student, non-VNNI CPU, min cosine 0.918 -> 0.951.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import numpy as np

from shrinkcli.atomic import temp_dir
from shrinkcli.errors import BadInputError

_FILES = {"fp32": "model.xml", "fp16": "model-fp16.xml", "int8": "model-int8.xml"}


def _save(ov_model, path: Path, *, fp16: bool) -> Path:
    import openvino as ov

    # Saved under a temporary name, .bin before .xml, so a reader never finds half a model.
    with temp_dir(path.parent, "openvino") as tmp:
        staged = Path(tmp) / path.name
        ov.save_model(ov_model, str(staged), compress_to_fp16=fp16)
        staged.with_suffix(".bin").replace(path.with_suffix(".bin"))
        staged.replace(path)
    return path


def _set_metadata(ov_model, props: dict[str, str]) -> None:
    for key, value in props.items():
        ov_model.set_rt_info(str(value), ["shrink", key])


def write(model, spec, out_dir: Path, *, onnx_graph=None, variants=("fp32",), calib=None,
          metadata: dict[str, str] | None = None) -> dict[str, Path]:
    import onnx
    import openvino as ov

    from shrinkcli.export.onnx_export import export_onnx

    written = {}
    with temp_dir(out_dir, "openvino-src") as tmp:
        # native PRelu: OpenVINO has its own fused PReLU, the onnxruntime-specific rewrites would only slow it
        source = export_onnx(model, Path(tmp) / "native.onnx", spec, graph=onnx_graph, prelu="native")
        props = {p.key: p.value for p in onnx.load(str(source)).metadata_props} | (metadata or {})
        float_model = ov.convert_model(str(source))
    for variant in variants:
        if variant == "int8":
            if calib is None or not len(calib):
                raise BadInputError("OpenVINO int8 needs calibration images", hint="pass --calib-data")
            ov_model = _quantize(float_model, calib)
        else:
            ov_model = float_model.clone()
        _set_metadata(ov_model, {**props, "dtype": variant})
        written[variant] = _save(ov_model, out_dir / _FILES[variant], fp16=variant == "fp16")
    return written


def _quantize(float_model, calib: np.ndarray):
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    samples = [calib[i:i + 1] for i in range(len(calib))]
    kept = sensitive_ops(float_model)
    scope = nncf.IgnoredScope(names=kept) if kept else None
    # NNCF logs its ignored-scope notes to stdout and draws progress bars: both stay off `--json` stdout.
    from nncf.common.logging import nncf_logger

    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return nncf.quantize(float_model.clone(), nncf.Dataset(samples), subset_size=len(samples),
                                 ignored_scope=scope,
                                 advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE))
    finally:
        nncf_logger.setLevel(level)


_WEIGHTED = ("Convolution", "GroupConvolution", "MatMul")


def sensitive_ops(ov_model) -> list[str]:
    """The first and the last two weighted operations, which stay fp32 (as in ONNX int8)."""
    names = [op.get_friendly_name() for op in ov_model.get_ordered_ops() if op.get_type_name() in _WEIGHTED]
    return [names[0], *names[-2:]] if len(names) > 3 else []


def companion_files(path: Path) -> list[Path]:
    return [path, path.with_suffix(".bin")]


def read_metadata(path: Path) -> dict[str, str]:
    import openvino as ov

    ov_model = ov.Core().read_model(str(path))
    if not ov_model.has_rt_info(["shrink"]):
        return {}
    section = ov_model.get_rt_info(["shrink"]).astype(dict)
    return {str(key): value.astype(str) if hasattr(value, "astype") else str(value) for key, value in section.items()}


def compile_model(path: Path, threads: int = 1):
    import openvino as ov

    if not Path(path).with_suffix(".bin").exists():
        raise BadInputError(f"{Path(path).with_suffix('.bin')} is missing", hint="an OpenVINO .xml needs its .bin beside it")
    core = ov.Core()
    try:
        ov_model = core.read_model(str(path))
        # f32 for what is not int8: on CPUs with AMX/avx512-bf16 OpenVINO would otherwise run bf16
        config = {"INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": "f32"}
        return core.compile_model(ov_model, "CPU", config)
    except RuntimeError as exc:
        raise BadInputError(f"{path} is not a loadable OpenVINO model: {str(exc).splitlines()[0][:200]}",
                            hint="re-export it with `shrink export --format openvino`") from exc


def embed(path: Path, inputs: np.ndarray, *, threads: int = 1, compiled=None, batch_size: int = 32) -> np.ndarray:
    compiled = compiled or compile_model(path, threads)
    return np.concatenate([np.asarray(compiled(inputs[i:i + batch_size])[0], dtype=np.float32)
                           for i in range(0, len(inputs), batch_size)])
