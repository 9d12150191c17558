"""`shrink export` end to end: run dirs, manifest, safetensors round trip, parity gate, source lookup."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from typer.testing import CliRunner

from shrinkcli.cli import app
from shrinkcli.models.io import load_model, save_model_safetensors
from shrinkcli.models.registry import create_model
from shrinkcli.rundir import RunDir

SIZE = 32
runner = CliRunner()


def _tiny_student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("mobilefacenet", input_size=SIZE, width=0.25, embedding_size=64)
    # BN statistics from real activations, as after training: embeddings then differ across images.
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "student.safetensors"
    return save_model_safetensors(_tiny_student(), path, preprocess={
        "mean": 127.5, "std": 127.5, "crop": None, "input_size": SIZE, "channel_order": "RGB"})


def _export(*args: str):
    result = runner.invoke(app, ["--json", "export", *args])
    return result, result.stdout


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def test_export_all_variants_with_manifest(weights, tmp_path):
    out = tmp_path / "export"
    # An untrained tiny student reaches ~0.96 in ONNX int8 (min over 16 images), under the 0.98 default: the
    # gate is lowered for the run and the fp32/fp16 numbers are checked against their own thresholds below.
    # `all` also writes every installed runtime, and the same gate applies there: OpenVINO int8 of this
    # student reaches 0.951 on a non-VNNI x86 CPU, too close to 0.95 to hold on every CPU, so the run's gate
    # is 0.94 while the ONNX int8 assertion below keeps its 0.95 (docs/export.md, OpenVINO).
    result, stdout = _export("--weights", str(weights), "--format", "all", "--dtype", "fp16",
                             "--quantize", "int8", "--calib-data", "synthetic:4:4:0", "--run-dir", str(out),
                             "--set", "min_cosine=0.94")
    assert result.exit_code == 0, result.output
    summary = json.loads(stdout)["summary"]
    assert summary["status"] == "ok" and summary["fp32_min_cosine"] >= 0.99999
    manifest = _manifest(out)
    assert manifest["status"] == "completed" and manifest["stage"] == "export"
    from shrinkcli.export import deploy

    runtimes = [r for r in deploy.RUNTIMES if deploy.available(r, to_write=True)]
    expected = {"onnx", "onnx-fp16", "onnx-int8", "safetensors"}
    expected |= {deploy.kind_of(r, v) for r in runtimes for v in ("fp32", "fp16", "int8") if v in deploy.FILES[r]}
    assert {o["kind"] for o in manifest["outputs"] if not o["kind"].endswith(("-metadata", "-weights"))} == expected
    for runtime in runtimes:     # every runtime file was gated in its runtime, fp32 at the fp32 bound
        assert manifest["results"]["parity"][runtime]["min_cosine"] >= 0.9999
        if "int8" in deploy.FILES[runtime]:
            assert manifest["results"]["parity"][f"{runtime}-int8"]["min_cosine"] >= 0.94
    for runtime in sorted(set(deploy.RUNTIMES) - set(runtimes)):
        assert f'pip install "shrink[{runtime}]"' in result.output
    [source] = manifest["inputs"]
    assert source["kind"] == "weights" and Path(source["path"]) == weights.resolve()
    parity = manifest["results"]["parity"]
    assert parity["fp32"]["min_cosine"] >= 0.99999 and parity["fp16"]["min_cosine"] >= 0.999
    assert parity["int8"]["min_cosine"] >= 0.95 and parity["int8"]["images_from"] == "synthetic:4:4:0"
    assert parity["int8"]["min_cosine_required"] == 0.94
    assert manifest["results"]["quantization"] == {"method": "static-qdq", "calibration_images": 16, "fp32_nodes": 3}
    sizes = manifest["results"]["sizes_bytes"]
    assert sizes["model-fp16.onnx"] < sizes["model.onnx"] and sizes["model-int8.onnx"] < sizes["model.onnx"]
    for name in ("model.ncnn.param", "model.xml"):          # a .param/.xml counts the .bin it needs
        if name in sizes:
            parts = (out / name).stat().st_size + (out / name).with_suffix(".bin").stat().st_size
            assert sizes[name] == parts, (name, sizes[name], parts)
    assert not list(out.glob("*.data"))
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert meta["source_sha256"] == source["sha256"] and meta["embedding_size"] == "64"


def test_safetensors_rebuilds_bit_exact(weights, tmp_path):
    out = tmp_path / "st"
    result, _ = _export("--weights", str(weights), "--format", "safetensors", "--run-dir", str(out))
    assert result.exit_code == 0, result.output
    rebuilt, meta = load_model(out / "model.safetensors")
    original = _tiny_student()
    assert meta["arch"] == "mobilefacenet" and meta["arch_kwargs"] == original.arch_kwargs
    assert meta["preprocess"]["input_size"] == SIZE
    for key, tensor in original.state_dict().items():
        assert torch.equal(tensor, rebuilt.state_dict()[key]), key
    assert [o["kind"] for o in _manifest(out)["outputs"]] == ["safetensors"]


def test_failed_check_exits_1_and_marks_run_failed(weights, tmp_path):
    out = tmp_path / "strict"
    result, _ = _export("--weights", str(weights), "--run-dir", str(out), "--set", "min_cosine=1.01")
    assert result.exit_code == 1
    assert "parity check failed" in result.stderr
    assert _manifest(out)["status"] == "failed"
    assert _manifest(out)["results"]["parity"]["fp32"]["passed"] is False
    skipped, _ = _export("--weights", str(weights), "--run-dir", str(tmp_path / "lenient"),
                         "--set", "min_cosine=1.01", "--no-check")
    assert skipped.exit_code == 0, skipped.output
    assert _manifest(tmp_path / "lenient")["results"]["parity"] == "skipped (--no-check)"


def _fake_distill_run(project: Path, name: str, model: torch.nn.Module, *, complete: bool) -> Path:
    run = RunDir.create("distill", root=project, name=name, config={"student": "mobilefacenet"})
    path = save_model_safetensors(model, run.file("model.safetensors"))
    run.add_output(path, "weights")
    if complete:
        run.finish()
    return run.path


def test_newest_completed_distill_run_is_exported(tmp_path):
    project = tmp_path / "runs"
    done = _fake_distill_run(project, "distill", _tiny_student(1), complete=True)
    _fake_distill_run(project, "distill2", _tiny_student(2), complete=False)  # still running: skipped
    result, stdout = _export("--project", str(project), "--format", "onnx")
    assert result.exit_code == 0, result.output
    assert f"newest completed distill run: {done}" in result.stderr
    out = Path(json.loads(stdout)["summary"]["run_dir"])
    assert out.parent == project / "export"
    assert Path(_manifest(out)["inputs"][0]["path"]) == (done / "model.safetensors").resolve()
    # ... and --run names the run dir explicitly.
    explicit, _ = _export("--run", str(done), "--format", "onnx", "--run-dir", str(tmp_path / "e2"))
    assert explicit.exit_code == 0, explicit.output


@pytest.mark.parametrize("args, message", [
    ([], "no completed distill run"),
    (["--run", "a", "--weights", "b"], "either --run or --weights"),
    (["--weights", "missing.safetensors"], "does not exist"),
    (["--weights", "w", "--format", "safetensors", "--dtype", "fp16"], "apply to ONNX output"),
])
def test_bad_input_exits_2(tmp_path, args, message):
    result = runner.invoke(app, ["export", "--project", str(tmp_path / "empty"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_exported_graphs_record_the_training_crop(tmp_path):
    from shrinkcli.evaluate.runners import open_runner

    weights = save_model_safetensors(_tiny_student(), tmp_path / "cropped.safetensors", preprocess={
        "mean": 127.5, "std": 127.5, "crop": 40, "input_size": SIZE, "channel_order": "RGB"})
    out = tmp_path / "export"
    result, _ = _export("--weights", str(weights), "--dtype", "fp16", "--run-dir", str(out))
    assert result.exit_code == 0, result.output
    for name in ("model.onnx", "model-fp16.onnx"):
        meta = {p.key: p.value for p in onnx.load(str(out / name)).metadata_props}
        assert meta["crop"] == "40", name
        runner = open_runner(str(out / name), "model")
        assert runner.crop == 40 and runner.crop_recorded   # verify/compare crop like training, unasked


@pytest.mark.parametrize("prelu, int8_source", [("split", "residual"), ("residual", "residual"), ("native", "native")])
def test_int8_is_quantized_from_a_graph_its_kernels_run_fast(weights, tmp_path, prelu, int8_source):
    out = tmp_path / "export"
    result, _ = _export("--weights", str(weights), "--quantize", "int8", "--run-dir", str(out),
                        "--set", f"prelu={prelu}", "--set", "min_cosine=0.9")
    assert result.exit_code == 0, result.output
    fp32 = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    int8 = {p.key: p.value for p in onnx.load(str(out / "model-int8.onnx")).metadata_props}
    assert fp32["prelu"] == prelu and int8["prelu"] == int8_source and int8["dtype"] == "int8"
    assert not [p for p in out.iterdir() if p.name.startswith("shrink-int8")]     # no temp dirs left


def test_fp32_and_int8_files_come_from_one_torch_export(weights, tmp_path, monkeypatch):
    import shrinkcli.export.onnx_export as onnx_export

    calls = []
    real = onnx_export.to_onnx_proto
    monkeypatch.setattr(onnx_export, "to_onnx_proto", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "export"
    result, _ = _export("--weights", str(weights), "--quantize", "int8", "--run-dir", str(out),
                        "--set", "min_cosine=0.9")
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
    ops = [node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node]
    assert "PRelu" not in ops and ops.count("Mul") > ops.count("Relu")       # split: two Muls per PReLU


def test_export_self_check_and_verify_are_one_parity_check(weights, tmp_path):
    """Same generated images for the same seed, same thresholds, same keys, same numbers."""
    from shrinkcli.evaluate.images import generated_pixels
    from shrinkcli.evaluate.parity import MIN_COSINE

    assert (generated_pixels(8, SIZE, seed=0) == generated_pixels(16, SIZE, seed=0)[:8]).all()
    assert not (generated_pixels(8, SIZE, seed=1) == generated_pixels(8, SIZE, seed=0)).all()
    out = tmp_path / "export"
    result, _ = _export("--weights", str(weights), "--run-dir", str(out), "--set", "check_images=8")
    assert result.exit_code == 0, result.output
    exported = _manifest(out)["results"]["parity"]["fp32"]
    verified = runner.invoke(app, ["--json", "verify", "--model", str(out / "model.onnx"), "--reference", str(weights),
                                   "--run-dir", str(tmp_path / "verify"), "--set", "parity_images=8"])
    assert verified.exit_code == 0, verified.output
    checked = json.loads((tmp_path / "verify" / "report.json").read_text())["parity"]
    shared = {"min_cosine", "mean_cosine", "max_abs_diff", "min_cosine_required", "passed", "finite"}
    assert shared <= set(exported) and shared <= set(checked)
    assert exported["min_cosine_required"] == checked["min_cosine_required"] == MIN_COSINE["fp32"] == 0.99999
    assert exported["min_cosine"] == pytest.approx(checked["min_cosine"], abs=1e-7)
    assert exported["max_abs_diff"] == pytest.approx(checked["max_abs_diff"], abs=1e-6)


def test_an_exporter_that_writes_another_opset_is_exit_2_not_a_wrong_manifest(weights, tmp_path, monkeypatch):
    from shrinkcli.export import onnx_export

    real = onnx_export._to_proto_dynamo

    def other_opset(wrapper, example, opset):
        proto = real(wrapper, example, opset)
        next(o for o in proto.opset_import if o.domain in ("", "ai.onnx")).version = opset + 1
        return proto

    monkeypatch.setattr(onnx_export, "_to_proto_dynamo", other_opset)
    result, _ = _export("--weights", str(weights), "--run-dir", str(tmp_path / "out"), "--set", "opset=18")
    assert result.exit_code == 2, result.output
    assert "the ONNX exporter wrote opset 19, not the requested 18" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_verify_of_an_export_run_refuses_a_reference_that_changed_since(tmp_path):
    """The parity reference an export run recorded is checked by sha256 before verify uses it."""
    source = tmp_path / "src" / "student.safetensors"
    source.parent.mkdir()
    preprocess = {"mean": 127.5, "std": 127.5, "crop": None, "input_size": SIZE, "channel_order": "RGB"}
    save_model_safetensors(_tiny_student(seed=0), source, preprocess=preprocess)
    out = tmp_path / "export"
    result, _ = _export("--weights", str(source), "--run-dir", str(out), "--set", "check_images=4")
    assert result.exit_code == 0, result.output
    save_model_safetensors(_tiny_student(seed=1), source, preprocess=preprocess)     # retrained in place
    verified = runner.invoke(app, ["verify", "--model", str(out), "--run-dir", str(tmp_path / "verify")])
    assert verified.exit_code == 2, verified.output
    line = verified.stderr.strip().splitlines()[-1]
    assert "(its reference)" in line and "changed since the run used it" in line, line
    assert "Traceback" not in verified.output
    source.unlink()
    gone = runner.invoke(app, ["verify", "--model", str(out), "--run-dir", str(tmp_path / "verify2")])
    assert gone.exit_code == 2 and "is missing" in gone.stderr.strip().splitlines()[-1], gone.output
