"""ncnn: `.param` + `.bin` through pnnx (TorchScript -> pnnx -> ncnn), run in ncnn's Python binding.

Only fp32 is written: the registry's ncnn package ships the runtime alone, without ncnn2table /
ncnn2int8, so there is no maintained int8 path to gate. The gate turns ncnn's fp16 storage and
arithmetic off, so it checks the conversion; a device that keeps them on (ncnn's default on ARM)
runs close to shrink's fp16 ONNX instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from shrinkcli.atomic import temp_dir
from shrinkcli.errors import BadInputError

INPUT, OUTPUT = "in0", "out0"


def write(model, spec, out_dir: Path, *, onnx_graph=None, variants=("fp32",), calib=None) -> dict[str, Path]:
    import pnnx
    import torch

    from shrinkcli.export.onnx_export import DeployWrapper, example_input

    wrapper = DeployWrapper(model, spec).eval()
    example = example_input(spec, batch=1)
    with temp_dir(out_dir, "ncnn") as tmp:
        traced = Path(tmp) / "model.pt"
        # pnnx reports every pass on stdout, which `--json` reserves for the result.
        with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
            pnnx.export(wrapper, str(traced), (example,))
        param, weights = Path(tmp) / "model.ncnn.param", Path(tmp) / "model.ncnn.bin"
        if not (param.exists() and weights.exists()):
            raise BadInputError("pnnx wrote no ncnn model", hint="report this model; ONNX export still works")
        # .bin first: a .param is only there once its weights are
        os.replace(shutil.copy(weights, Path(tmp) / "b.tmp"), out_dir / "model.ncnn.bin")
        os.replace(shutil.copy(param, Path(tmp) / "p.tmp"), out_dir / "model.ncnn.param")
    return {"fp32": out_dir / "model.ncnn.param"}


def companion_files(path: Path) -> list[Path]:
    return [path, path.with_suffix(".bin")]


def open_net(path: Path, threads: int = 1):
    import ncnn

    weights = Path(path).with_suffix(".bin")
    if not weights.exists():
        raise BadInputError(f"{weights} is missing", hint="an ncnn .param needs the .bin written beside it")
    net = ncnn.Net()
    net.opt.num_threads = int(threads)
    # fp32 end to end: the gate checks the conversion, not ncnn's reduced-precision defaults
    for flag in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(net.opt, flag, False)
    if net.load_param(str(path)) != 0 or net.load_model(str(weights)) != 0:
        raise BadInputError(f"{path} is not a loadable ncnn model", hint="re-export it with `shrink export --format ncnn`")
    return net


def embed(path: Path, inputs: np.ndarray, *, threads: int = 1, net=None) -> np.ndarray:
    import ncnn

    net = net or open_net(path, threads)
    outputs = []
    for image in np.asarray(inputs, dtype=np.float32):     # ncnn runs one image (C, H, W) per extractor
        extractor = net.create_extractor()
        extractor.input(INPUT, ncnn.Mat(np.ascontiguousarray(image)).clone())
        _, out = extractor.extract(OUTPUT)
        outputs.append(np.array(out).reshape(-1))
    return np.stack(outputs)
