"""int8 ONNX via onnxruntime.quantization.

Static QDQ quantization (per-channel weights, activations calibrated on real images) when images
are given; dynamic quantization (weights only, activations quantised at run time) otherwise.
Static is both faster and more accurate for convolutional networks, so calibration data is the
recommended path.

Two choices below were measured on MobileFaceNet (min cosine vs fp32 torch over 8 images, 112 px):
percentile calibration (99.999th) instead of min/max ranges, 0.918 -> 0.948, and keeping the first
convolution and the last two weighted layers (the embedding head) in fp32, -> 0.955: the input
layer sees raw pixel statistics and the head's errors go straight into the embedding.

Weights use 7 of their 8 bits (`reduce_range`). With uint8 activations onnxruntime's x86 kernels
multiply u8 x s8 pairs with an instruction that saturates at int16 on CPUs without VNNI (AVX2,
AVX-512F): on an AVX2 machine untrained tiny students fell from min cosine 0.93-0.98 (the same
int8 file run as plain QDQ arithmetic) to 0.73-0.89 in the fused kernels, so a file that passed
the gate on one CPU broke on another. 7-bit weights cannot saturate; they cost -0.024..+0.010 in
min cosine on those students and use the same kernels (same speed) everywhere.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from shrinkcli import log
from shrinkcli.atomic import atomic_write_bytes, temp_dir
from shrinkcli.errors import BadInputError
from shrinkcli.export.onnx_export import INPUT_NAME, set_metadata


class ArrayCalibrationReader:
    """onnxruntime CalibrationDataReader over an array already in the graph's input format."""

    def __init__(self, inputs: np.ndarray, batch_size: int = 8):
        self._batches = [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
        self._position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._position >= len(self._batches):
            return None
        batch = self._batches[self._position]
        self._position += 1
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._position = 0


def _preprocessed(fp32_path: Path, workdir: Path) -> Path:
    """Shape inference + graph optimisation that onnxruntime recommends before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = workdir / "prepared.onnx"
    try:
        quant_pre_process(str(fp32_path), str(target), skip_symbolic_shape=True)
    except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation, quantizing works without it
        log.warning(f"quantization pre-processing skipped ({type(exc).__name__}: {str(exc)[:160]})")
        return fp32_path
    return target


WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


def sensitive_nodes(model_path: Path) -> list[str]:
    """Names of the first and the last two weighted nodes, which stay fp32."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weighted = [node.name for node in graph.node if node.op_type in WEIGHTED_OPS and node.name]
    if len(weighted) <= 3:
        return []
    return [weighted[0], *weighted[-2:]]


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calib_inputs: np.ndarray | None = None) -> dict:
    """Write an int8 version of `fp32_path`; `calib_inputs` (graph-input format) selects static QDQ.

    Returns {"method": "static-qdq" | "dynamic", "calibration_images": n}.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    source_props = {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}
    if source_props.get("prelu") == "split":
        raise BadInputError(f"{fp32_path} has its PReLUs written for fp32 onnxruntime (prelu=split), which runs "
                            "slowly once quantized",
                            hint="quantize a graph exported with prelu=residual (`shrink export --quantize int8` does this)")
    with temp_dir(out_path.parent, "int8") as tmp:
        workdir = Path(tmp)
        prepared = _preprocessed(fp32_path, workdir)
        produced = workdir / "int8.onnx"
        if calib_inputs is not None and len(calib_inputs):
            kept_fp32 = sensitive_nodes(prepared)
            # The calibrator prints internals on stdout, which `--json` reserves for the result.
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                quantize_static(str(prepared), str(produced), ArrayCalibrationReader(calib_inputs),
                                quant_format=QuantFormat.QDQ, per_channel=True,
                                # uint8 activations: onnxruntime's x86 kernels then run the depthwise
                                # convs in int8 too (with int8 activations they stay fp32; measured 1.17x).
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                reduce_range=True,   # no int16 saturation on non-VNNI x86 (module doc)
                                calibrate_method=CalibrationMethod.Percentile, nodes_to_exclude=kept_fp32,
                                extra_options={"CalibPercentile": 99.999})
            info = {"method": "static-qdq", "calibration_images": int(len(calib_inputs)),
                    "fp32_nodes": len(kept_fp32)}
        else:
            log.warning("no --calib-data: using dynamic int8 quantization (slower and less accurate "
                        "than static; pass --calib-data with a few hundred face images)")
            quantize_dynamic(str(prepared), str(produced), weight_type=QuantType.QInt8, per_channel=True)
            info = {"method": "dynamic", "calibration_images": 0}
        # Loading pulls in any external data the quantizer wrote, so the result is saved as one file.
        proto = onnx.load(str(produced), load_external_data=True)
    set_metadata(proto, {**source_props, "dtype": "int8", "quantization": info["method"]})
    data = proto.SerializeToString()
    if not data:
        raise BadInputError(f"int8 quantization of {fp32_path} produced an empty model")
    atomic_write_bytes(out_path, data)
    return info
