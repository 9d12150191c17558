"""Embedding runners (ONNX with uint8 input, dtype detection) and identification on real faces."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from shrinkcli.cli import app

runner = CliRunner()
SIZE = 32


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from _helpers import tiny_student_files

    return tiny_student_files(tmp_path_factory.mktemp("runners"), size=SIZE)


def test_runner_reads_dtype_and_uint8_input(artifacts, tmp_path):
    import onnx

    from shrinkcli.evaluate.runners import open_runner
    from shrinkcli.export.onnx_export import GraphSpec, export_onnx
    from shrinkcli.models.io import load_model

    model, _ = load_model(artifacts["weights"])
    path = tmp_path / "u8.onnx"
    export_onnx(model, path, GraphSpec(input_size=SIZE, include_preprocess=True, layout="nhwc"),
                exporter="torchscript")
    graph = open_runner(str(path))
    torch_runner = open_runner(str(artifacts["weights"]))
    assert graph.uint8_input and graph.nhwc and graph.dtype == "fp32" and graph.input_size == SIZE
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, SIZE, SIZE), dtype=np.uint8)
    np.testing.assert_allclose(graph.embed(pixels), torch_runner.embed(pixels), atol=1e-4)
    assert torch_runner.latency_ms(1, seconds=0) > 0 and torch_runner.params() > graph.params()  # BN folded in ONNX
    assert torch_runner.macs() == graph.macs() > 0
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "dtype", "int8"
    del proto.metadata_props[[p.key for p in proto.metadata_props].index("dtype")]
    onnx.save(proto, str(tmp_path / "int8.onnx"))
    assert open_runner(str(tmp_path / "int8.onnx")).dtype == "int8"


def test_identification_on_real_faces_with_distractors(artifacts, orl_root, tmp_path):
    result = runner.invoke(app, ["--json", "verify", "--model", str(artifacts["onnx"]), "--data", f"folder:{orl_root}",
                                 "--run-dir", str(tmp_path / "o"), "--set", "distractors=synthetic:10:2:3",
                                 "--set", "latency_seconds=0", "--set", "parity_images=8"])
    assert result.exit_code == 0, result.output
    ident = json.loads(result.stdout)["report"]["identification"]["model"]
    # ORL: 40 people x 10 images -> 40 gallery images, 360 probes; chance is 1/40
    assert (ident["probes"], ident["gallery"], ident["distractors"]) == (360, 40, 20)
    assert ident["rank1"] > 4 / 40


def test_onnx_without_crop_takes_the_references_crop(artifacts, tmp_path):
    from shrinkcli.models.io import load_model, save_model_safetensors

    model, _ = load_model(artifacts["weights"])
    cropped = tmp_path / "cropped.safetensors"
    save_model_safetensors(model, cropped, preprocess={"mean": 127.5, "std": 127.5, "crop": 60,
                                                       "input_size": SIZE, "channel_order": "RGB"})
    result = runner.invoke(app, ["--json", "verify", "--model", str(artifacts["onnx"]), "--reference", str(cropped),
                                 "--run-dir", str(tmp_path / "c"), "--set", "latency_seconds=0",
                                 "--set", "parity_images=4"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["report"]["model"]["crop"] == 60
