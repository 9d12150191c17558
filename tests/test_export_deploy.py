"""ncnn / OpenVINO / TFLite exports: files written, parity gated in each runtime, verify runs them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from shrinkcli.config import ExportConfig
from shrinkcli.errors import BadInputError, GateFailedError
from shrinkcli.export import deploy
from shrinkcli.evaluate.images import generated_pixels
from shrinkcli.evaluate.parity import parity
from shrinkcli.models.io import save_model_safetensors
from shrinkcli.models.registry import create_model
from shrinkcli.rundir import RunOptions
from shrinkcli.stages import export

SIZE = 32


def _needs(runtime: str):
    reason = f'the {runtime} extra is not installed (pip install "shrink[{runtime}]")'
    if runtime == "tflite":     # .ci/run leaves it out: litert-torch pulls jax and transformers (docs/export.md)
        reason += "; CI installs .[test,ncnn,openvino] only, TFLite is checked by hand"
    return pytest.mark.skipif(not deploy.available(runtime, to_write=True), reason=reason)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("mobilefacenet", input_size=SIZE, width=0.25, embedding_size=64)
    for module in model.modules():      # BN statistics from activations, so embeddings differ per image
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    path = tmp_path_factory.mktemp("src") / "student.safetensors"
    return save_model_safetensors(model.eval(), path, preprocess={
        "mean": 127.5, "std": 127.5, "crop": None, "input_size": SIZE, "channel_order": "RGB"})


def _run(weights: Path, out: Path, **settings):
    import dataclasses

    # the source is a config field or (older stage signature) a keyword of run()
    if "weights" in {f.name for f in dataclasses.fields(ExportConfig)}:
        return export.run(ExportConfig.from_dict({"weights": str(weights), **settings}), RunOptions(run_dir=str(out)))
    return export.run(ExportConfig.from_dict(settings), RunOptions(run_dir=str(out)), weights=str(weights))


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _runs_like_torch(weights: Path, model_file: Path) -> float:
    from shrinkcli.evaluate.runners import open_runner

    pixels = generated_pixels(4, SIZE, seed=3)
    runner = open_runner(str(model_file))
    assert runner.input_size == SIZE and runner.kind == deploy.SUFFIX_RUNTIME[model_file.suffix]
    return parity(open_runner(str(weights)).raw(pixels), runner.raw(pixels))["min_cosine"]


@_needs("openvino")
def test_openvino_fp32_fp16_int8_gated_in_openvino(weights, tmp_path):
    out = tmp_path / "ov"
    # An untrained tiny student in int8 is a harsh case (min cosine 0.918 here, see
    # shrinkcli.export.openvino); the 0.98 default is for trained models.
    _run(weights, out, format="openvino", dtype="fp16", quantize="int8", calib_data="synthetic:4:4:0",
         min_cosine=0.9)
    parity = _manifest(out)["results"]["parity"]
    assert parity["openvino"]["min_cosine"] >= 0.9999 and parity["openvino-fp16"]["min_cosine"] >= 0.999
    assert parity["openvino-int8"]["min_cosine"] >= 0.9 and parity["openvino-int8"]["passed"]
    assert {o["kind"] for o in _manifest(out)["outputs"]} >= {"openvino", "openvino-weights", "openvino-metadata",
                                                              "openvino-fp16", "openvino-int8"}
    meta = json.loads((out / "model.xml.json").read_text())
    assert meta["runtime"] == "openvino" and meta["embedding_size"] == "64" and meta["dtype"] == "fp32"
    from shrinkcli.export.openvino import read_metadata

    assert read_metadata(out / "model-int8.xml")["dtype"] == "int8"      # also inside the IR
    assert _runs_like_torch(weights, out / "model.xml") >= 0.9999


@_needs("ncnn")
def test_ncnn_fp32_gated_in_ncnn(weights, tmp_path):
    out = tmp_path / "ncnn"
    report = _run(weights, out, format="ncnn", quantize="int8")     # no int8 tool for ncnn: fp32 only
    assert sorted(p.name for p in out.glob("model.ncnn*")) == ["model.ncnn.bin", "model.ncnn.param",
                                                               "model.ncnn.param.json"]
    assert _manifest(out)["results"]["parity"]["ncnn"]["min_cosine"] >= 0.9999
    assert report["summary"]["status"] == "ok"
    assert _runs_like_torch(weights, out / "model.ncnn.param") >= 0.9999


@_needs("tflite")
def test_tflite_fp32_and_int8_gated_in_litert(weights, tmp_path):
    out = tmp_path / "tflite"
    _run(weights, out, format="tflite", quantize="int8", calib_data="synthetic:4:4:0", min_cosine=0.85)
    parity = _manifest(out)["results"]["parity"]
    assert parity["tflite"]["min_cosine"] >= 0.9999 and parity["tflite-int8"]["passed"]
    assert _runs_like_torch(weights, out / "model.tflite") >= 0.9999


@_needs("openvino")
def test_failed_runtime_gate_exits_1_with_numbers(weights, tmp_path):
    out = tmp_path / "strict"
    with pytest.raises(GateFailedError, match=r"openvino min cosine [01]\.\d+ < 1\.01"):
        _run(weights, out, format="openvino", min_cosine=1.01)
    assert _manifest(out)["status"] == "failed"


@pytest.mark.parametrize("runtime", deploy.RUNTIMES)
def test_missing_extra_is_one_line_naming_pip(weights, tmp_path, monkeypatch, runtime):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(BadInputError) as error:
        _run(weights, tmp_path / runtime, format=runtime)
    assert f"{runtime} runtime is not installed" in str(error.value)
    assert f'pip install "shrink[{runtime}]"' in error.value.hint


def test_unknown_model_file_for_verify_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="not an ncnn, OpenVINO or TFLite model"):
        deploy.embed(tmp_path / "model.engine", generated_pixels(1, SIZE).astype("float32"))
