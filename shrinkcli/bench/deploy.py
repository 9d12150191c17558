"""Suite `deploy`: ncnn, OpenVINO and TFLite against onnxruntime on the same faces and threads.

Every file is written the way `shrink export` writes it (`shrinkcli.export.deploy.write_runtime`,
onnxruntime int8 from `quantize_int8` on the residual-PReLU graph) from one student, fp32 and int8
(calibrated on faces that are not timed). The timed faces are the same for every runtime and go one
image per call, as on a device. Per thread count (1 and 2; --quick: 1) all files run interleaved in
one round robin, so load on the machine hits every runtime alike; a row's ratio is the runtime's
images/s over onnxruntime's for the same precision and threads (> 1: faster than onnxruntime).
Each file's parity cosine is against the fp32 torch model on the timed faces.
A runtime whose extra is missing is skipped with a row that says so.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from shrinkcli.bench.timing import info_row, interleaved_rates, ratio_row

SUITE = "deploy"


def _student(weights: str | None, quick: bool):
    """The model to deploy and its preprocessing: --weights, else a random-init student with face BN."""
    import torch

    if weights:
        from shrinkcli.models.io import load_model

        model, meta = load_model(weights)
        pre = meta.get("preprocess") or {}
        return model.float().eval(), int(pre.get("input_size", 112)), pre.get("crop"), Path(weights).name
    from shrinkcli.models import create_model

    torch.manual_seed(0)
    kwargs = {"width": 0.25, "embedding_size": 64} if quick else {"embedding_size": 512}
    size = 32 if quick else 112
    model = create_model("mobilefacenet", input_size=size, **kwargs)
    return model, size, None, "random-init mobilefacenet, BN settled on the calibration faces"


def _faces(count: int, input_size: int, crop: int | None) -> tuple[np.ndarray, str]:
    from shrinkcli.bench.data import LFW_CROP, lfw_images_root
    from shrinkcli.evaluate.images import parity_pixels

    root = lfw_images_root()
    spec = f"folder:{root}" if root else None
    pixels, _ = parity_pixels(spec, count, input_size=input_size, crop=(crop or LFW_CROP) if root else None)
    return pixels, ("LFW faces" if root else "generated images")


def _ort_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def _runtime_runner(runtime: str, path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    from shrinkcli.export import deploy

    mod = deploy.module(runtime)
    if runtime == "ncnn":
        net = mod.open_net(path, threads)
        return lambda x: mod.embed(path, x, net=net)
    if runtime == "openvino":
        compiled = mod.compile_model(path, threads)
        return lambda x: mod.embed(path, x, compiled=compiled, batch_size=1)
    runner = mod.interpreter(path, threads)
    return lambda x: mod.embed(path, x, runner=runner)


def _write_files(model, spec, tmp: Path, calib: np.ndarray) -> tuple[dict[tuple[str, str], Path], list[str]]:
    """{(runtime, variant): file} for onnxruntime and every installed runtime; notes on what is missing."""
    from shrinkcli.export import deploy
    from shrinkcli.export.onnx_export import export_onnx
    from shrinkcli.export.quantize import quantize_int8

    files = {("onnxruntime", "fp32"): export_onnx(model, tmp / "model.onnx", spec)}
    residual = export_onnx(model, tmp / "residual.onnx", spec, prelu="residual")
    quantize_int8(residual, tmp / "model-int8.onnx", spec.graph_input(calib))
    files[("onnxruntime", "int8")] = tmp / "model-int8.onnx"
    notes = []
    for runtime in deploy.RUNTIMES:
        if not deploy.available(runtime, to_write=True):
            notes.append(f"{runtime}: skipped, its extra is not installed (the {runtime} extra of shrink)")
            continue
        variants = [v for v in ("fp32", "int8") if v in deploy.FILES[runtime]]
        if "int8" not in variants:
            notes.append(f"{runtime}: no int8 file (the registry's ncnn package ships no ncnn2int8)")
        out = tmp / runtime
        out.mkdir()
        written = deploy.write_runtime(runtime, model, spec, out, variants=variants, calib_pixels=calib, metadata={})
        files.update({(runtime, variant): path for variant, path in written.items()})
    return files, notes


def run(quick: bool = False, weights: str | None = None, **_: Any) -> dict[str, Any]:
    from shrinkcli.export import deploy
    from shrinkcli.evaluate.parity import gate
    from shrinkcli.export.check import torch_embeddings
    from shrinkcli.export.onnx_export import GraphSpec

    timed_count, calib_count = (4, 8) if quick else (32, 64)
    thread_counts = (1,) if quick else (1, 2)
    repeats = 2 if quick else 5
    model, size, crop, origin = _student(weights, quick)
    pixels, source = _faces(calib_count + timed_count, size, crop)
    calib, timed = pixels[:calib_count], pixels[calib_count:]
    if not weights:
        from shrinkcli.bench.int8 import settle_batchnorm

        settle_batchnorm(model, ((calib.astype(np.float32) - 127.5) / 127.5))
    spec = GraphSpec(input_size=size)
    reference = torch_embeddings(model, spec, timed)
    rows: list[dict[str, Any]] = []
    parity: list[dict[str, Any]] = []
    detail = f"{origin}, {size} px, 1 image per call over {timed_count} {source}, int8 calibrated on {calib_count} others"
    with tempfile.TemporaryDirectory(prefix="shrink-bench-deploy-") as tmp:
        files, notes = _write_files(model, spec, Path(tmp), calib)
        inputs = {key: deploy.runtime_spec(key[0], spec).graph_input(timed) if key[0] != "onnxruntime"
                  else spec.graph_input(timed) for key in files}
        for threads in thread_counts:
            runners = {key: (_ort_runner(path, threads) if key[0] == "onnxruntime"
                             else _runtime_runner(key[0], path, threads)) for key, path in files.items()}
            if threads == thread_counts[0]:
                for (runtime, variant), runner in runners.items():
                    check = gate(reference, runner(inputs[(runtime, variant)]), variant)
                    parity.append({"runtime": runtime, "variant": variant, "file": files[(runtime, variant)].name,
                                   "min_cosine": round(check["min_cosine"], 6),
                                   "mean_cosine": round(check["mean_cosine"], 6),
                                   "gate": check["min_cosine_required"], "passed": check["passed"]})
            workloads = {key: (lambda r=runner, x=inputs[key]: len(r(x))) for key, runner in runners.items()}
            rates = interleaved_rates(workloads, repeats=repeats, warmup=1)
            for (runtime, variant), rate in rates.items():
                if runtime == "onnxruntime":
                    continue
                base = rates[("onnxruntime", variant)]
                rows.append(ratio_row(SUITE, f"{runtime} {variant} vs onnxruntime {variant}, {threads} thread"
                                      f"{'s' if threads > 1 else ''} (speed-up)", a="onnxruntime", a_value=1000 / base,
                                      b=runtime, b_value=1000 / rate, unit="ms/img", ratio=rate / base, target=None,
                                      settings=detail))
            rows.append(info_row(SUITE, f"onnxruntime int8 vs fp32, {threads} thread{'s' if threads > 1 else ''} "
                                 "(speed-up, the baseline's own)", a="fp32", a_value=1000 / rates[("onnxruntime", "fp32")],
                                 b="int8", b_value=1000 / rates[("onnxruntime", "int8")], unit="ms/img",
                                 settings=f"ratio {rates[('onnxruntime', 'int8')] / rates[('onnxruntime', 'fp32')]:.2f}x"))
    for note in notes:
        rows.append(info_row(SUITE, note, a="", a_value=None, unit="", settings=detail))
    return {"rows": rows, "tables": {"deploy parity (min / mean cosine vs fp32 torch, same faces)": parity}}
