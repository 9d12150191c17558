"""ONNX teachers: insightface-style IResNet graphs imported into torch, other graphs as onnxruntime teachers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _onnx_models import count_ops, export_onnx, fold_bn, onnxsim_simplify, trained_looking
from shrinkcli.cli import app
from shrinkcli.models import create_model
from shrinkcli.models.onnx_import import load_onnx_teacher

SIZE = 32
TINY = dict(embedding_size=16, input_size=SIZE, width=0.125)
DISTILL = ["--data", "synthetic:4:4", "--width", "0.25", "--embedding-size", "16", "--epochs", "1",
           "--batch-size", "8", "--set", "workers=0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two IResNet depths as arcface_torch exports them (BN folded by the exporter) and with every
    BatchNormalization kept, the kept one folded by our own pass, and a MobileFaceNet."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for seed, arch in enumerate(["r18", "r34"]):
        model = trained_looking(create_model(arch, **TINY), seed=seed + 1)
        out[arch] = model
        out[f"{arch}-folded"] = export_onnx(model, root / f"{arch}_folded.onnx")
        out[f"{arch}-present"] = export_onnx(model, root / f"{arch}_present.onnx", bn="present")
        out[f"{arch}-ownfold"] = fold_bn(out[f"{arch}-present"], root / f"{arch}_ownfold.onnx")
    torch.manual_seed(0)
    out["mfn-model"] = create_model("mobilefacenet", embedding_size=16, input_size=SIZE, width=0.25).eval()
    out["mfn"] = export_onnx(out["mfn-model"], root / "mobilefacenet.onnx", input_name="input.1")
    return out


def cli(*args):
    result = CliRunner().invoke(app, ["--json", *args])
    summary = json.loads(result.stdout)["summary"] if result.exit_code == 0 else None
    return result, summary


def error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.startswith("shrink: error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("arch", ["r18", "r34"])
@pytest.mark.parametrize("variant", ["folded", "present", "ownfold"])
def test_iresnet_graph_maps_exactly_onto_the_registry_model(files, arch, variant):
    path = files[f"{arch}-{variant}"]
    ops = count_ops(path)
    assert ops["BatchNormalization"] == ({"r18": 31, "r34": 55}[arch] if variant == "present" else
                                         {"r18": 10, "r34": 18}[arch])
    model, meta = load_onnx_teacher(path)
    info = meta["onnx"]
    assert (meta["arch"], meta["arch_kwargs"]) == (arch, TINY)
    assert info["kind"] == "iresnet" and info["opset"] == 11
    assert info["folded_bn"] == (0 if variant == "present" else ops["Conv"])
    assert info["parity"]["min_cosine"] >= 0.9999 and info["parity"]["max_abs_diff"] < 1e-4
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mine, original = model.forward_features(x), files[arch].forward_features(x)
    torch.testing.assert_close(mine.embedding, original.embedding, atol=1e-5, rtol=1e-4)
    assert len(mine.stage_maps) == 4
    for a, b in zip(mine.stage_maps, original.stage_maps):      # stage maps too: multi-stage distillation needs them
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_onnxsim_folded_graph_imports(files, tmp_path):
    pytest.importorskip("onnxsim")
    path = onnxsim_simplify(files["r18-present"], tmp_path / "sim.onnx")
    assert count_ops(path)["BatchNormalization"] == 10
    model, meta = load_onnx_teacher(path)
    assert meta["arch"] == "r18" and meta["onnx"]["folded_bn"] == 21
    assert meta["onnx"]["parity"]["min_cosine"] >= 0.9999


def test_fixed_batch_newest_opset_and_any_input_name(files, tmp_path):
    import onnx

    fixed = export_onnx(files["r18"], tmp_path / "fixed.onnx", opset=17, batch=1, input_name="input.1")
    model, meta = load_onnx_teacher(fixed)
    assert meta["onnx"]["contract"]["fixed_batch"] == 1 and meta["onnx"]["opset"] == 17
    assert meta["onnx"]["parity"]["samples"] == 16                # 16 images through a batch-1 graph
    # the newest opset this onnx knows, by its own converter (torch's dynamo exporter takes ~20 s here)
    opset = onnx.defs.onnx_opset_version()
    newest = tmp_path / "newest.onnx"
    onnx.save(onnx.version_converter.convert_version(onnx.load(str(files["r18-present"])), opset), str(newest))
    model, meta = load_onnx_teacher(newest)
    assert meta["onnx"]["opset"] == opset and meta["arch"] == "r18"
    assert meta["onnx"]["parity"]["min_cosine"] >= 0.9999


def test_bgr_graph_becomes_an_rgb_teacher(files, tmp_path):
    bgr_model = copy.deepcopy(files["r18"])
    with torch.no_grad():
        bgr_model.conv1.weight.copy_(bgr_model.conv1.weight.flip(1))   # the same network, fed BGR
    path = export_onnx(bgr_model, tmp_path / "bgr.onnx")
    model, meta = load_onnx_teacher(path, {"channel_order": "BGR"})
    assert meta["onnx"]["contract"]["channel_order"] == "BGR" and meta["preprocess"]["channel_order"] == "RGB"
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), files["r18"](x), atol=1e-5, rtol=1e-4)


def test_cli_import_then_multi_stage_distill(files, tmp_path):
    project = str(tmp_path / "runs")
    result, summary = cli("teacher", "--load", str(files["r18-folded"]), "--project", project)
    assert result.exit_code == 0, result.output
    assert summary["teacher_kind"] == "iresnet" and summary["stages"] == 4 and summary["arch"] == "r18"
    assert summary["parity_min_cosine"] >= 0.9999 and summary["parity_max_abs_diff"] < 1e-4
    manifest = json.loads((Path(summary["run_dir"]) / "manifest.json").read_text())
    contract = manifest["results"]["onnx_input_contract"]
    assert (contract["input_size"], contract["mean"], contract["std"], contract["channel_order"]) == (SIZE, 127.5, 127.5, "RGB")
    result, distilled = cli("distill", "--teacher", summary["run_dir"], *DISTILL, "--project", project)
    assert result.exit_code == 0, result.output
    metrics = (Path(distilled["run_dir"]) / "metrics.jsonl").read_text()
    assert all(f'"distill_s{k}"' in metrics for k in range(1, 5)), metrics[:400]


def test_cli_distill_straight_from_an_iresnet_onnx(files, tmp_path):
    result, summary = cli("distill", "--teacher", str(files["r34-present"]), *DISTILL, "--cache-teacher",
                          "--project", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert summary["cached_teacher"] is True and summary["teacher_forward_steps"] == 0


def test_unknown_graph_is_an_embedding_only_teacher(files, tmp_path):
    project = str(tmp_path / "runs")
    result, summary = cli("teacher", "--load", str(files["mfn"]), "--project", project)
    assert result.exit_code == 0, result.output
    assert summary["teacher_kind"] == "embedding-only" and summary["stages"] == 0
    assert summary["embedding_size"] == 16 and summary["input_size"] == SIZE
    run_dir = summary["run_dir"]
    assert summary["weights"].endswith("model.onnx")
    # embedding distillation without labels, teacher outputs cached: no teacher forward during training
    result, distilled = cli("distill", "--teacher", run_dir, *DISTILL, "--no-labels", "--cache-teacher",
                            "--project", project)
    assert result.exit_code == 0, result.output
    assert distilled["cached_teacher"] is True and distilled["teacher_forward_steps"] == 0
    assert (Path(distilled["run_dir"]) / "teacher_cache" / "key.json").exists() or \
        any(Path(distilled["run_dir"]).glob("teacher_cache/*/key.json"))
    # with labels, inline teacher (onnxruntime on every step)
    result, distilled = cli("distill", "--teacher", str(files["mfn"]), *DISTILL, "--project", project)
    assert result.exit_code == 0, result.output
    assert distilled["teacher_forward_steps"] == distilled["steps"] > 0
    metrics = (Path(distilled["run_dir"]) / "metrics.jsonl").read_text()
    assert '"distill_emb"' in metrics and '"distill_s1"' not in metrics


def test_stage_losses_from_an_embedding_only_teacher_are_refused(files, tmp_path):
    result, _ = cli("distill", "--teacher", str(files["mfn"]), *DISTILL, "--stage-weights", "0,1,0,0",
                    "--project", str(tmp_path / "runs"))
    assert result.exit_code == 2
    assert "stage maps" in error_line(result)


def test_cached_embedding_teacher_equals_onnxruntime(files):
    from shrinkcli.models.onnx_graph import make_session, read_onnx, resolve_contract, run_embeddings

    teacher, _ = load_onnx_teacher(files["mfn"])
    x = torch.randn(5, 3, SIZE, SIZE)
    onnx_file = read_onnx(files["mfn"])
    direct = run_embeddings(make_session(onnx_file), resolve_contract(onnx_file), x.numpy())
    np.testing.assert_allclose(teacher(x).numpy(), direct, rtol=0, atol=0)
    with torch.no_grad():
        np.testing.assert_allclose(teacher(x).numpy(), files["mfn-model"](x).numpy(), atol=1e-4)
