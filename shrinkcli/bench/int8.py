"""Suite `int8`: static int8 (`shrinkcli.export.quantize.quantize_int8`) vs the fp32 student in onnxruntime.

Target: int8 >= 1.5x faster than fp32 at the same batch. Calibration uses real faces (LFW, centre
crop 128) when ../shared/data is present, else synthetic faces; the parity measure is the cosine
between int8 and fp32 embeddings on held-out images. Face-verification accuracy needs a trained
student, which this suite does not train: with random weights only the cosine is meaningful.

The full run also times quantization variants (activation type, QDQ vs QOperator format) and counts
which operators end up in int8, to explain the speed rather than just report it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shrinkcli.bench.data import LFW_CROP, lfw_images_root
from shrinkcli.bench.onnx import export, ort_session, ort_workload, run_threads_note
from shrinkcli.bench.timing import info_row, interleaved_rates, ratio_row

SUITE = "int8"


def face_batch(count: int, input_size: int) -> tuple[np.ndarray, str]:
    """`count` normalised face images (float32 NCHW) and where they came from."""
    from shrinkcli.data import open_dataset

    root = lfw_images_root()
    if root is not None:
        dataset, source = open_dataset(f"folder:{root}", input_size=input_size, crop=LFW_CROP), "LFW"
    else:
        dataset, source = open_dataset(f"synthetic:{count}:1:3", input_size=input_size), "synthetic"
    step = max(1, len(dataset) // count)   # spread over identities, not the first few people
    return np.stack([dataset[i * step][0].numpy() for i in range(count)]), source


def settle_batchnorm(model: torch.nn.Module, images: np.ndarray) -> None:
    """Give a randomly initialised model realistic BN statistics, so activations have face-like ranges."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.from_numpy(images))
    model.eval()


def op_counts(path: Path) -> str:
    """Operator histogram after onnxruntime's own fusions (QDQ pairs around a Conv become QLinearConv)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    counts = collections.Counter(node.op_type for node in graph.node)
    return ", ".join(f"{op} {n}" for op, n in counts.most_common(6))


def quantize_variant(prepared: Path, out: Path, calib: np.ndarray, *, activation: str, fmt: str) -> Path:
    """onnxruntime static quantization with one setting changed from the shipped recipe."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from shrinkcli.export.quantize import ArrayCalibrationReader, sensitive_nodes

    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        quantize_static(str(prepared), str(out), ArrayCalibrationReader(calib),
                        quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8 if activation == "u8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=sensitive_nodes(prepared))
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def run(quick: bool = False, **_: Any) -> dict[str, Any]:
    from shrinkcli.export.quantize import _preprocessed, quantize_int8
    from shrinkcli.models import create_model

    input_size, batch_size, calib_count = (32, 4, 8) if quick else (112, 16, 64)
    repeats = 2 if quick else 5
    images, source = face_batch(calib_count + batch_size, input_size)
    calib, batch = images[:calib_count], images[calib_count:]
    torch.manual_seed(0)
    student = create_model("mobilefacenet", embedding_size=512, input_size=input_size)
    settle_batchnorm(student, calib)
    with tempfile.TemporaryDirectory(prefix="shrink-bench-int8-") as tmp:
        tmp_path = Path(tmp)
        fp32 = export(student, tmp_path / "fp32.onnx", input_size)                  # as shipped: PReLU split
        fp32_native = export(student, tmp_path / "fp32-native.onnx", input_size, prelu="native")
        int8 = tmp_path / "int8.onnx"
        info = quantize_int8(fp32_native, int8, calib)                              # as `shrink export` does
        sessions = {"fp32": ort_session(fp32), "fp32 native": ort_session(fp32_native), "int8": ort_session(int8)}
        variants: dict[str, Path] = {}
        if not quick:
            prepared = _preprocessed(fp32_native, tmp_path)
            for activation, fmt in (("u8", "qdq"), ("u8", "qoperator")):
                name = f"int8 {fmt} {activation}s8 minmax"
                variants[name] = quantize_variant(prepared, tmp_path / f"{fmt}-{activation}.onnx", calib,
                                                  activation=activation, fmt=fmt)
                sessions[name] = ort_session(variants[name])
        rates = interleaved_rates({name: ort_workload(s, batch, runs=2) for name, s in sessions.items()},
                                  repeats=repeats, warmup=1)
        embeddings = {name: s.run(None, {s.get_inputs()[0].name: batch})[0] for name, s in sessions.items()}
        shipped_ops, fp32_ops = op_counts(int8), op_counts(fp32)
        variant_ops = {name: op_counts(path) for name, path in variants.items()}
    detail = (f"mobilefacenet {input_size} px, batch {batch_size}, {info['method']} (u8s8, per-channel, "
              f"percentile calibration on {calib_count} {source} images, first conv + head fp32), {run_threads_note()}")
    cos = cosines(embeddings["fp32"], embeddings["int8"])
    rows = [ratio_row(SUITE, "int8 vs fp32 student (onnxruntime, speed-up)", a="fp32 onnx", a_value=1000 / rates["fp32"],
                      b="int8 onnx", b_value=1000 / rates["int8"], unit="ms/img", ratio=rates["int8"] / rates["fp32"],
                      target=1.5, settings=detail),
            info_row(SUITE, "int8 vs fp32 with native PRelu (the graph it was quantized from), speed-up",
                     a="fp32 native onnx", a_value=1000 / rates["fp32 native"], b="int8 onnx", b_value=1000 / rates["int8"],
                     unit="ms/img", settings=f"ratio {rates['int8'] / rates['fp32 native']:.2f}x"),
            info_row(SUITE, "int8 vs fp32 embedding cosine (min / mean over held-out images)", a="min", a_value=float(cos.min()),
                     b="mean", b_value=float(cos.mean()), unit="cosine",
                     settings=f"{len(batch)} held-out {source} images; random-init student with settled BN: "
                              "verification accuracy needs a trained model")]
    for name in variants:
        rows.append(info_row(SUITE, f"variant {name}: speed-up vs fp32", a="int8 / fp32",
                             a_value=rates[name] / rates["fp32"], unit="x",
                             settings=f"ops: {variant_ops[name]}; cosine min {cosines(embeddings['fp32'], embeddings[name]).min():.4f}"))
    tables = {"int8 graph operators after onnxruntime fusion": [{"graph": "fp32 (split PReLU)", "ops": fp32_ops},
                                                                {"graph": "int8 (shipped)", "ops": shipped_ops}]}
    return {"rows": rows, "tables": tables}
