"""ONNX teachers: the input contract, refused files (exit 2), the parity gate (exit 1), verify --teacher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from _onnx_models import export_onnx, trained_looking
from shrinkcli.cli import app
from shrinkcli.models import create_model

SIZE = 32


def cli(*args):
    result = CliRunner().invoke(app, ["--json", *args])
    return result, (json.loads(result.stdout)["summary"] if result.exit_code == 0 else None)


def one_error(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.startswith("shrink: error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def tiny_graph(path: Path, *, input_type=TensorProto.FLOAT, shape=("N", 3, SIZE, SIZE), outputs: int = 1,
               opset: int = 13) -> Path:
    """Mean over the image as a 3-d "embedding" (a stand-in for a vendor model)."""
    nodes = [helper.make_node("ReduceMean", ["x"] if input_type == TensorProto.FLOAT else ["xf"], ["m"],
                              axes=[2, 3], keepdims=0)]
    if input_type != TensorProto.FLOAT:
        nodes.insert(0, helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
    outs = [helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 3])]
    if outputs > 1:
        nodes.append(helper.make_node("Neg", ["m"], ["n"]))
        outs.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, ["N", 3]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", input_type, list(shape))], outs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


@pytest.fixture(scope="module")
def mfn(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("mobilefacenet", embedding_size=16, input_size=SIZE, width=0.25).eval()
    return model, export_onnx(model, tmp_path_factory.mktemp("m") / "mfn.onnx")


@pytest.mark.parametrize("case, expected", [
    ("external", "external data"),
    ("outputs", "2 outputs"),
    ("uint8", "not a float image batch"),
    ("nhwc", "not N x 3 x H x W"),
    ("nonsquare", "square"),
])
def test_refused_files_give_one_line_and_exit_2(tmp_path, mfn, case, expected):
    path = tmp_path / f"{case}.onnx"
    if case == "external":
        onnx.save(onnx.load(str(mfn[1])), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="weights.bin", size_threshold=0)
    elif case == "outputs":
        tiny_graph(path, outputs=2)
    elif case == "uint8":
        tiny_graph(path, input_type=TensorProto.UINT8)
    elif case == "nhwc":
        tiny_graph(path, shape=("N", SIZE, SIZE, 3))
    else:
        tiny_graph(path, shape=("N", 3, SIZE, SIZE + 16))
    result, _ = cli("teacher", "--load", str(path), "--project", str(tmp_path / "runs"))
    assert result.exit_code == 2, result.output
    assert expected in one_error(result)
    assert not (tmp_path / "runs").exists()              # nothing written for a refused file


def test_contract_from_options_is_recorded(tmp_path):
    path = tiny_graph(tmp_path / "vendor.onnx", shape=("N", 3, "H", "W"))    # dynamic size: options decide
    result, summary = cli("teacher", "--load", str(path), "--input-size", "48", "--set", "mean=0",
                          "--set", "std=255", "--set", "channel_order=BGR", "--project", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert (summary["input_size"], summary["mean"], summary["std"], summary["channel_order"]) == (48, 0.0, 255.0, "BGR")
    assert summary["contract_from"] == "options" and summary["teacher_kind"] == "embedding-only"
    manifest = json.loads((Path(summary["run_dir"]) / "manifest.json").read_text())
    assert manifest["results"]["onnx_input_contract"]["mean"] == 0.0
    # the run dir's copy carries the contract: read back from the file without any option
    from shrinkcli.models.onnx_graph import read_onnx, resolve_contract

    contract = resolve_contract(read_onnx(summary["weights"]))
    assert (contract.source, contract.input_size, contract.std, contract.channel_order) == ("file metadata", 48, 255.0, "BGR")


def test_shrink_metadata_wins_and_a_contradicting_option_is_refused(tmp_path):
    from shrinkcli.export.onnx_export import set_metadata

    path = tiny_graph(tmp_path / "exported.onnx", shape=("N", 3, "H", "W"))
    proto = onnx.load(str(path))
    set_metadata(proto, {"shrink_version": "0", "input_size": "64", "mean": "127.5", "std": "128.0",
                         "channel_order": "RGB"})
    onnx.save(proto, str(path))
    result, summary = cli("teacher", "--load", str(path), "--project", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert (summary["input_size"], summary["std"], summary["contract_from"]) == (64, 128.0, "file metadata")
    result, _ = cli("teacher", "--load", str(path), "--set", "std=1", "--project", str(tmp_path / "runs2"))
    assert result.exit_code == 2 and "records std=128.0" in one_error(result)


def test_parity_gate_fails_with_exit_1(tmp_path, monkeypatch):
    from shrinkcli.models import onnx_import

    model = trained_looking(create_model("r18", embedding_size=16, input_size=SIZE, width=0.125), seed=3)
    path = export_onnx(model, tmp_path / "r18.onnx")
    real_build = onnx_import.build_iresnet

    def off_by_a_little(state, channel_order="RGB"):   # a mapping bug: one stage's shortcut BN scale wrong
        built = real_build(state, channel_order)
        with torch.no_grad():
            built.layer3[0].downsample[1].weight.mul_(3.0)
        return built

    monkeypatch.setattr(onnx_import, "build_iresnet", off_by_a_little)
    result, _ = cli("teacher", "--load", str(path), "--project", str(tmp_path / "runs"))
    assert result.exit_code == 1, result.output
    line = one_error(result)
    assert "does not reproduce it" in line and "max abs diff" in line


def test_verify_compares_a_student_with_an_onnx_teacher(tmp_path, mfn):
    from shrinkcli.models.io import save_model_safetensors

    torch.manual_seed(1)
    student = create_model("mobilefacenet", embedding_size=16, input_size=SIZE, width=0.25).eval()
    weights = save_model_safetensors(student, tmp_path / "student.safetensors")
    result, summary = cli("verify", "--model", str(weights), "--teacher", str(mfn[1]),
                          "--pairs", "pairs:20@synthetic:4:2:1", "--set", "latency_seconds=0",
                          "--project", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    report = json.loads((Path(summary["run_dir"]) / "report.json").read_text())
    assert report["teacher"]["kind"] == "onnx" and report["teacher"]["file"] == "mfn.onnx"
    assert 0.0 <= summary["teacher_accuracy"] <= 1.0 and "gap" in summary


def test_bgr_teacher_copy_is_fed_bgr_by_verify(tmp_path, mfn):
    from shrinkcli.evaluate.runners import open_runner

    result, summary = cli("teacher", "--load", str(mfn[1]), "--set", "channel_order=BGR",
                          "--project", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, SIZE, SIZE), dtype=np.uint8)
    copy_runner, plain = open_runner(summary["run_dir"], "teacher"), open_runner(str(mfn[1]), "teacher")
    np.testing.assert_allclose(copy_runner.raw(pixels), plain.raw(pixels[:, ::-1]), atol=1e-6)
