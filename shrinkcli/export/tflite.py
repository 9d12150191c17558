"""TFLite (LiteRT): `.tflite` through litert-torch, int8 through LiteRT's ai-edge-quantizer.

The float file takes float32 NCHW like the ONNX graph (litert-torch keeps PyTorch's layout and
inserts the transposes). int8 is the quantizer's full static recipe (int8 weights and
activations, calibrated on the calibration images). Its input and output are int8 too, with the
scale and zero point in the tensors' quantization parameters: feed round(x / scale) + zero_point
and read (q - zero_point) * scale, as `embed` does.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np

from shrinkcli.atomic import atomic_write_bytes, temp_dir
from shrinkcli.errors import BadInputError

_FILES = {"fp32": "model.tflite", "int8": "model-int8.tflite"}


def write(model, spec, out_dir: Path, *, onnx_graph=None, variants=("fp32",), calib=None) -> dict[str, Path]:
    import litert_torch
    import torch

    from shrinkcli.export.onnx_export import DeployWrapper, example_input

    wrapper = DeployWrapper(model, spec).eval()
    with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
        converted = litert_torch.convert(wrapper, (example_input(spec, batch=1),))
    with temp_dir(out_dir, "tflite") as tmp:
        staged = Path(tmp) / "model.tflite"
        with contextlib.redirect_stdout(sys.stderr):     # its "Write Model" progress lines, off `--json` stdout
            converted.export(str(staged))
        float_bytes = staged.read_bytes()
    written = {}
    if "fp32" in variants or "int8" in variants:
        written["fp32"] = atomic_write_bytes(out_dir / _FILES["fp32"], float_bytes)
    if "int8" in variants:
        if calib is None or not len(calib):
            raise BadInputError("TFLite int8 needs calibration images", hint="pass --calib-data")
        written["int8"] = atomic_write_bytes(out_dir / _FILES["int8"], _quantize(written["fp32"], calib))
    return written


def _quantize(float_path: Path, calib: np.ndarray) -> bytes:
    from ai_edge_quantizer import quantizer, recipe

    qt = quantizer.Quantizer(str(float_path))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    signature = _signature(float_path)
    samples = {signature["key"]: [{signature["input"]: calib[i:i + 1]} for i in range(len(calib))]}
    with contextlib.redirect_stdout(sys.stderr):
        result = qt.quantize(qt.calibrate(samples))
    return bytes(result.quantized_model)


def _signature(path: Path) -> dict[str, str]:
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(path)).get_signature_list()
    key = next(iter(signatures))
    return {"key": key, "input": signatures[key]["inputs"][0]}


def companion_files(path: Path) -> list[Path]:
    return [path]


def interpreter(path: Path, threads: int = 1):
    from ai_edge_litert.interpreter import Interpreter

    try:
        runner = Interpreter(model_path=str(path), num_threads=int(threads))
        runner.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise BadInputError(f"{path} is not a loadable TFLite model: {str(exc).splitlines()[0][:200]}",
                            hint="re-export it with `shrink export --format tflite`") from exc
    return runner


def embed(path: Path, inputs: np.ndarray, *, threads: int = 1, runner=None) -> np.ndarray:
    runner = runner or interpreter(path, threads)
    source, target = runner.get_input_details()[0], runner.get_output_details()[0]
    outputs = []
    in_scale, in_zero = source["quantization"]
    out_scale, out_zero = target["quantization"]
    integer = np.dtype(source["dtype"]).kind in "iu"
    for i in range(len(inputs)):            # the file has a fixed batch of one
        x = np.asarray(inputs[i:i + 1], dtype=np.float32)
        if integer:
            info = np.iinfo(source["dtype"])
            x = np.clip(np.round(x / in_scale) + in_zero, info.min, info.max)
        runner.set_tensor(source["index"], np.ascontiguousarray(x, dtype=source["dtype"]))
        runner.invoke()
        y = np.array(runner.get_tensor(target["index"]), dtype=np.float32).reshape(1, -1)
        outputs.append((y - out_zero) * out_scale if out_scale else y)
    return np.concatenate(outputs)
