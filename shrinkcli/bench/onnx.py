"""Suite `onnx`: deployed latency of the exported student against the teachers and against PyTorch.

Every graph comes from `shrinkcli.export.onnx_export.export_onnx` (float input, fp32) and runs in
onnxruntime with intra-op threads = torch's thread count and one inter-op thread, so both runtimes
get the same cores. Rates are images/s on the same random batch; rows report ms per image.
Targets: student >= 8x faster than IResNet-50 and IResNet-90 (all at 112 px, 512-d), and the
ONNX student at least as fast as the PyTorch eager channels_last student (>= 1.0x). The student
is exported as shipped (PReLU split for onnxruntime's blocked kernels, see shrinkcli.export.prelu);
an info row times the native-PRelu export beside it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from shrinkcli.bench.timing import info_row, interleaved_rates, ratio_row

SUITE = "onnx"


def ort_session(path: str | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_workload(session, batch: np.ndarray, runs: int = 1) -> Callable[[], int]:
    name = session.get_inputs()[0].name

    def infer() -> int:
        for _ in range(runs):
            session.run(None, {name: batch})
        return runs * len(batch)

    return infer


def torch_workload(model: torch.nn.Module, batch: np.ndarray, runs: int = 1) -> Callable[[], int]:
    """Eager PyTorch as it runs best on CPU: eval, inference_mode, channels_last."""
    model = model.eval().to(memory_format=torch.channels_last)
    images = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)

    def infer() -> int:
        with torch.inference_mode():
            for _ in range(runs):
                model(images)
        return runs * len(batch)

    return infer


def export(model: torch.nn.Module, path: Path, input_size: int, prelu: str = "split") -> Path:
    from shrinkcli.export.onnx_export import GraphSpec, export_onnx

    return export_onnx(model, path, GraphSpec(input_size=input_size), prelu=prelu)


def face_batch(count: int, input_size: int) -> tuple[np.ndarray, str]:
    """Normalised face images (real LFW when present, else smooth generated images): onnxruntime's
    PReLU costs ~40% more on random-sign noise than on images, so noise would misstate deployment."""
    from shrinkcli.bench.data import LFW_CROP, lfw_images_root
    from shrinkcli.evaluate.images import parity_pixels

    root = lfw_images_root()
    spec = f"folder:{root}" if root else None
    pixels, source = parity_pixels(spec, count, input_size=input_size, crop=LFW_CROP if root else None)
    return ((pixels.astype(np.float32) - 127.5) / 127.5), ("LFW faces" if root else "generated images")


def run_threads_note() -> str:
    return f"onnxruntime intra-op threads = torch threads = {torch.get_num_threads()}, inter-op 1"


def run(quick: bool = False, **_: Any) -> dict[str, Any]:
    from shrinkcli import log
    from shrinkcli.models import create_model

    input_size, batch_size = (32, 4) if quick else (112, 16)
    repeats = 2 if quick else 5
    teachers = ["r18"] if quick else ["r50", "r90"]   # quick: a smoke run; exporting r50/r90 alone takes ~30 s
    torch.manual_seed(0)
    batch, source = face_batch(batch_size, input_size)
    student = create_model("mobilefacenet", embedding_size=512, input_size=input_size)
    workloads: dict[str, Callable[[], int]] = {}
    with tempfile.TemporaryDirectory(prefix="shrink-bench-onnx-") as tmp:
        workloads["student onnx"] = ort_workload(ort_session(export(student, Path(tmp) / "student.onnx", input_size)),
                                                 batch, runs=4)
        workloads["student onnx native"] = ort_workload(
            ort_session(export(student, Path(tmp) / "native.onnx", input_size, prelu="native")), batch, runs=4)
        workloads["student torch"] = torch_workload(student, batch, runs=4)
        for name in teachers:
            teacher = create_model(name, embedding_size=512, input_size=input_size)
            log.info(f"bench onnx: exporting {name}")
            workloads[f"{name} onnx"] = ort_workload(ort_session(export(teacher, Path(tmp) / f"{name}.onnx", input_size)), batch)
            del teacher
        rates = interleaved_rates(workloads, repeats=repeats, warmup=1)
    ms = {name: 1000.0 / rate for name, rate in rates.items()}
    detail = f"{input_size} px, batch {batch_size} of {source}, 512-d, fp32, {run_threads_note()}"
    rows = [ratio_row(SUITE, f"student vs {name} (onnxruntime, speed-up)", a=f"{name} onnx", a_value=ms[f"{name} onnx"],
                      b="mobilefacenet onnx", b_value=ms["student onnx"], unit="ms/img",
                      ratio=ms[f"{name} onnx"] / ms["student onnx"], target=8.0, settings=detail)
            for name in teachers]
    rows.append(ratio_row(SUITE, "student: onnxruntime vs PyTorch eager channels_last (speed-up)",
                          a="mobilefacenet torch", a_value=ms["student torch"], b="mobilefacenet onnx",
                          b_value=ms["student onnx"], unit="ms/img", ratio=ms["student torch"] / ms["student onnx"],
                          target=1.0, settings=detail))
    rows.append(info_row(SUITE, "student: split PReLU (shipped) vs native PRelu export, onnxruntime (speed-up)",
                         a="native PRelu", a_value=ms["student onnx native"], b="split", b_value=ms["student onnx"],
                         unit="ms/img", settings=f"{detail}; ratio {ms['student onnx native'] / ms['student onnx']:.2f}x"))
    return {"rows": rows}
