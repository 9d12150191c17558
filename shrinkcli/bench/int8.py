"""Suite `int8`: static int8 (`shrinkcli.export.quantize.quantize_int8`) vs the fp32 student in onnxruntime.

Target: int8 >= 1.5x faster than fp32 at the same batch, measured for the default MobileFaceNet
(PReLU; int8 is quantized from its residual-PReLU graph, fp32 is the shipped split-PReLU graph) and
for `mobilefacenet-relu`, the int8 deployment variant. Calibration uses real faces (LFW, centre
crop 128) when ../shared/data is present, else synthetic faces; the parity measure is the cosine
between int8 and fp32 embeddings on held-out images. Face-verification accuracy needs a trained
student, which this suite does not train: with random weights only the cosine is meaningful.

The full run also times quantization variants (the native-PRelu source, QDQ vs QOperator format)
and counts which operators end up in int8, to explain the speed rather than just report it.
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


def measure_student(arch: str, tmp_path: Path, calib: np.ndarray, batch: np.ndarray, *, input_size: int,
                    repeats: int, with_variants: bool) -> dict[str, Any]:
    """fp32 (as shipped) and int8 (as `shrink export --quantize int8` makes it) of one random-init student."""
    from shrinkcli.export.quantize import _preprocessed, quantize_int8
    from shrinkcli.models import create_model

    torch.manual_seed(0)
    student = create_model(arch, embedding_size=512, input_size=input_size)
    settle_batchnorm(student, calib)
    fp32 = export(student, tmp_path / f"{arch}-fp32.onnx", input_size)                 # as shipped: PReLU split
    fp32_residual = export(student, tmp_path / f"{arch}-fp32-residual.onnx", input_size, prelu="residual")
    int8 = tmp_path / f"{arch}-int8.onnx"
    info = quantize_int8(fp32_residual, int8, calib)                                   # as `shrink export` does
    paths = {"fp32": fp32, "fp32 residual": fp32_residual, "int8": int8}
    if with_variants:
        fp32_native = export(student, tmp_path / f"{arch}-fp32-native.onnx", input_size, prelu="native")
        paths["int8 from native PRelu"] = tmp_path / f"{arch}-int8-native.onnx"
        quantize_int8(fp32_native, paths["int8 from native PRelu"], calib)
        prepared = _preprocessed(fp32_residual, tmp_path)
        paths["int8 qoperator u8s8 minmax"] = quantize_variant(prepared, tmp_path / f"{arch}-qoperator.onnx", calib,
                                                               activation="u8", fmt="qoperator")
    sessions = {name: ort_session(path) for name, path in paths.items()}
    rates = interleaved_rates({name: ort_workload(sess, batch, runs=2) for name, sess in sessions.items()},
                              repeats=repeats, warmup=1)
    embeddings = {name: sess.run(None, {sess.get_inputs()[0].name: batch})[0] for name, sess in sessions.items()}
    ops = {name: op_counts(path) for name, path in paths.items() if name != "fp32 residual"}
    return {"rates": rates, "embeddings": embeddings, "ops": ops, "info": info}


def run(quick: bool = False, **_: Any) -> dict[str, Any]:
    input_size, batch_size, calib_count = (32, 4, 8) if quick else (112, 16, 64)
    repeats = 2 if quick else 5
    images, source = face_batch(calib_count + batch_size, input_size)
    calib, batch = images[:calib_count], images[calib_count:]
    rows: list[dict[str, Any]] = []
    op_table: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="shrink-bench-int8-") as tmp:
        for arch in ("mobilefacenet", "mobilefacenet-relu"):
            result = measure_student(arch, Path(tmp), calib, batch, input_size=input_size, repeats=repeats,
                                     with_variants=not quick and arch == "mobilefacenet")
            rates, embeddings = result["rates"], result["embeddings"]
            detail = (f"{arch} {input_size} px, batch {batch_size}, {result['info']['method']} (u8s8, per-channel, "
                      f"percentile calibration on {calib_count} {source} images, first conv + head fp32), "
                      f"{run_threads_note()}")
            cos = cosines(embeddings["fp32"], embeddings["int8"])
            rows.append(ratio_row(SUITE, f"int8 vs fp32 {arch} (onnxruntime, speed-up)", a="fp32 onnx",
                                  a_value=1000 / rates["fp32"], b="int8 onnx", b_value=1000 / rates["int8"],
                                  unit="ms/img", ratio=rates["int8"] / rates["fp32"], target=1.5, settings=detail))
            if arch == "mobilefacenet":
                rows.append(info_row(SUITE, "int8 vs fp32 with residual PReLU (the graph int8 is quantized from), speed-up",
                                     a="fp32 residual onnx", a_value=1000 / rates["fp32 residual"], b="int8 onnx",
                                     b_value=1000 / rates["int8"], unit="ms/img",
                                     settings=f"ratio {rates['int8'] / rates['fp32 residual']:.2f}x"))
            rows.append(info_row(SUITE, f"int8 vs fp32 {arch} embedding cosine (min / mean over held-out images)",
                                 a="min", a_value=float(cos.min()), b="mean", b_value=float(cos.mean()), unit="cosine",
                                 settings=f"{len(batch)} held-out {source} images; random-init student with settled BN: "
                                          "verification accuracy needs a trained model (docs/benchmarks.md)"))
            for name in rates:
                if name.startswith("int8 ") and name != "int8":
                    rows.append(info_row(SUITE, f"variant {name}: speed-up vs fp32", a="int8 / fp32",
                                         a_value=rates[name] / rates["fp32"], unit="x",
                                         settings=f"ops: {result['ops'][name]}; cosine min "
                                                  f"{cosines(embeddings['fp32'], embeddings[name]).min():.4f}"))
            op_table += [{"graph": f"{arch} fp32 (shipped)", "ops": result["ops"]["fp32"]},
                         {"graph": f"{arch} int8 (shipped)", "ops": result["ops"]["int8"]}]
    return {"rows": rows, "tables": {"graph operators after onnxruntime fusion": op_table}}
