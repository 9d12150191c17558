"""Values read from files (weights metadata, manifests) are validated where they are read, and
weights or embeddings that are not finite are refused instead of scored: through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from shrinkcli.cli import app
from shrinkcli.models import create_model
from shrinkcli.models.io import save_model_safetensors

runner = CliRunner()
PREPROCESS = {"input_size": 32, "mean": 127.5, "std": 127.5, "crop": None}


def _weights(path, *, preprocess=PREPROCESS, nan=False):
    torch.manual_seed(0)
    model = create_model("mobilefacenet", embedding_size=16, input_size=32, width=0.25).eval()
    if nan:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
    return save_model_safetensors(model, path, preprocess)


def _last_line(result) -> str:
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    return result.stderr.strip().splitlines()[-1]


def test_verify_of_nan_weights_is_exit_1_and_its_json_is_strict(tmp_path):
    weights = _weights(tmp_path / "nan.safetensors", nan=True)
    result = runner.invoke(app, ["--json", "verify", "--model", str(weights), "--reference", str(weights),
                                 "--set", "latency_seconds=0", "--project", str(tmp_path / "runs")])
    assert result.exit_code == 1, result.output
    assert "non-finite embeddings" in _last_line(result)
    if result.stdout.strip():
        json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in --json output"))
    manifests = list((tmp_path / "runs").rglob("manifest.json"))
    assert manifests and all(json.loads(m.read_text())["status"] == "failed" for m in manifests)


def test_export_of_nan_weights_is_exit_1_before_any_file(tmp_path):
    weights = _weights(tmp_path / "nan.safetensors", nan=True)
    result = runner.invoke(app, ["export", "--weights", str(weights), "--run-dir", str(tmp_path / "e")])
    assert result.exit_code == 1, result.output
    assert "non-finite weights" in _last_line(result)
    assert not (tmp_path / "e").exists()


def test_embed_of_nan_weights_is_exit_1(tmp_path):
    weights = _weights(tmp_path / "nan.safetensors", nan=True)
    result = runner.invoke(app, ["embed", str(weights), "--data", "synthetic:8:4:0", "--out", str(tmp_path / "s")])
    assert result.exit_code == 1, result.output
    assert "non-finite embeddings" in _last_line(result)


def test_compare_with_nan_weights_is_exit_1_and_its_json_is_strict(tmp_path):
    good = _weights(tmp_path / "good.safetensors")
    bad = _weights(tmp_path / "nan.safetensors", nan=True)
    result = runner.invoke(app, ["--json", "compare", "--a", str(good), "--b", str(bad),
                                 "--pairs", "pairs:40@synthetic:8:4:1", "--bootstrap", "50"])
    assert result.exit_code == 1, result.output
    assert "non-finite embeddings" in _last_line(result)
    if result.stdout.strip():
        json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in --json output"))


@pytest.mark.parametrize("preprocess, needle", [
    ({**PREPROCESS, "mean": "x"}, "mean = 'x' is not a finite number"),
    ({**PREPROCESS, "std": 0}, "std is 0"),
    ({**PREPROCESS, "input_size": "big"}, "input_size = 'big' is not a positive integer"),
    ({**PREPROCESS, "crop": -4}, "crop = -4 is not a positive integer"),
])
@pytest.mark.parametrize("command", ["export", "verify"])
def test_bad_preprocessing_metadata_in_weights_is_exit_2(tmp_path, preprocess, needle, command):
    weights = _weights(tmp_path / "odd.safetensors", preprocess=preprocess)
    args = (["export", "--weights", str(weights), "--run-dir", str(tmp_path / "e")] if command == "export" else
            ["verify", "--model", str(weights), "--set", "latency_seconds=0", "--run-dir", str(tmp_path / "e")])
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    line = _last_line(result)
    assert needle in line and "odd.safetensors" in line
    assert not (tmp_path / "e").exists()
