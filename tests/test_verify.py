"""`shrink verify` end to end on a tiny model: parity gate (a tampered ONNX fails with exit 1),
accuracy and identification on synthetic faces, reports, manifest, and bad input (exit 2)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shrinkcli.cli import app

runner = CliRunner()
SIZE = 32
PAIRS = "pairs:80@synthetic:10:4:1"
DATA = "synthetic:10:4:1"
FAST = ["--set", "latency_seconds=0", "--set", "parity_images=8"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    import onnx
    from onnx import numpy_helper

    from _helpers import tiny_student_files

    root = tmp_path_factory.mktemp("verify")
    files = tiny_student_files(root, size=SIZE)     # seeded: module fixtures run before the per-test seeding
    weights, good = files["weights"], files["onnx"]
    proto = onnx.load(str(good))
    first_conv_weight = next(n for n in proto.graph.node if n.op_type == "Conv").input[1]
    for init in proto.graph.initializer:
        if init.name == first_conv_weight:
            weight = numpy_helper.to_array(init).copy()
            weight.flat[0] += 1.0                      # one weight changed
            init.CopyFrom(numpy_helper.from_array(weight, init.name))
    tampered = root / "tampered.onnx"
    onnx.save(proto, str(tampered))
    return {"root": root, "weights": weights, "onnx": good, "tampered": tampered}


def _invoke(*args):
    return runner.invoke(app, ["--json", "verify", *map(str, args)])


def test_verify_passes_and_writes_reports(artifacts, tmp_path):
    run_dir = tmp_path / "v"
    result = _invoke("--model", artifacts["onnx"], "--reference", artifacts["weights"], "--teacher",
                     artifacts["onnx"], "--pairs", PAIRS, "--data", DATA, "--run-dir", run_dir,
                     "--set", "latency_seconds=0.05", "--set", "parity_images=8")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    summary = out["summary"]
    assert summary["status"] == "ok" and summary["parity_min_cosine"] > 0.9999
    assert 0.0 <= summary["model_accuracy"] <= 1.0 and abs(summary["gap"]) < 0.02
    assert 0.0 <= summary["model_rank1"] <= 1.0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["pairs"]["pairs"] == 80 and report["pairs"]["folds"] == 10
    assert report["identification"]["model"]["probes"] == 10 * 3      # first image of each id is gallery
    assert report["model"]["latency_ms_b1"] > 0 and report["teacher"]["latency_ms_b32"] > 0
    markdown = (run_dir / "report.md").read_text()
    assert "| teacher |" in markdown and "| model |" in markdown and "accuracy" in markdown
    assert (run_dir / "roc.png").read_bytes()[:4] == b"\x89PNG"
    roc = report["roc"]["model: model.onnx"]
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0 and len(roc["fpr"]) == len(roc["tpr"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"model", "reference", "teacher", "pairs"} <= {r["kind"] for r in manifest["inputs"]}
    assert {"report", "report-md", "roc-plot"} <= {r["kind"] for r in manifest["outputs"]}
    assert manifest["status"] == "completed"


def test_tampered_onnx_fails_parity_with_exit_1(artifacts, tmp_path):
    result = _invoke("--model", artifacts["tampered"], "--reference", artifacts["weights"],
                     "--run-dir", tmp_path / "t", *FAST)
    assert result.exit_code == 1, result.output
    out = json.loads(result.stdout)                   # --json still prints the result
    assert out["summary"]["status"].startswith("FAILED") and out["summary"]["parity_min_cosine"] < 0.9999
    assert "parity min cosine" in result.stderr and "Traceback" not in result.output
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["status"] == "failed"


def test_missing_file_is_one_line_exit_2(tmp_path):
    result = _invoke("--model", tmp_path / "nope.onnx", "--run-dir", tmp_path / "m")
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nope.onnx does not exist" in lines[0]
    assert not (tmp_path / "m").exists()              # nothing created for a refused command


def test_accuracy_gate_and_gate_needs_pairs(artifacts, tmp_path):
    result = _invoke("--model", artifacts["weights"], "--pairs", PAIRS, "--min-accuracy", "0.999",
                     "--run-dir", tmp_path / "a", *FAST)
    assert result.exit_code == 1 and "accuracy" in result.stderr       # an untrained model is far below
    result = _invoke("--model", artifacts["weights"], "--max-gap", "0.01", "--run-dir", tmp_path / "b", *FAST)
    assert result.exit_code == 2 and "--max-gap needs" in result.stderr
    assert not (tmp_path / "b").exists()
    result = _invoke("--model", artifacts["weights"], "--pairs", tmp_path / "none.bin", "--run-dir", tmp_path / "c")
    assert result.exit_code == 2 and not (tmp_path / "c").exists()


def test_export_run_dir_supplies_its_reference(artifacts, tmp_path):
    from shrinkcli.rundir import RunDir

    export = RunDir.create("export", run_dir=tmp_path / "export")
    export.add_input(artifacts["weights"], "weights")
    target = export.file("model.onnx")
    target.write_bytes(Path(artifacts["tampered"]).read_bytes())
    export.add_output(target, "onnx")
    export.finish()
    result = _invoke("--model", export.path, "--run-dir", tmp_path / "r", *FAST)
    assert result.exit_code == 1 and "parity" in result.stderr
    target.write_bytes(b"changed after the run")
    result = _invoke("--model", export.path, "--run-dir", tmp_path / "r2", *FAST)
    assert result.exit_code == 2 and "sha256 mismatch" in result.stderr
