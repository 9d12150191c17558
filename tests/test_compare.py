"""`shrink compare` on tiny models: per-pair bookkeeping, seed groups, the --min-gain gate, bad input."""

import json

import pytest
from typer.testing import CliRunner

from shrinkcli.cli import app

runner = CliRunner()
SIZE = 32
PAIRS = "pairs:40@synthetic:8:3:1"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch

    from shrinkcli.models import create_model
    from shrinkcli.models.io import save_model_safetensors

    root = tmp_path_factory.mktemp("compare")
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = create_model("mobilefacenet", embedding_size=32, input_size=SIZE, width=0.25).eval()
        path = root / f"seed{seed}.safetensors"
        save_model_safetensors(model, path, preprocess={"mean": 127.5, "std": 127.5, "crop": None,
                                                        "input_size": SIZE, "channel_order": "RGB"})
        paths.append(str(path))
    return paths


def _compare(*args):
    return runner.invoke(app, ["--json", "compare", "--pairs", PAIRS, "--bootstrap", "300", *map(str, args)])


def test_compare_bookkeeping_and_groups(models):
    result = _compare("--a", models[0], "--b", models[1], "--b", models[2])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    summary, rows = out["summary"], out["tables"]["models"]
    assert summary["pairs"] == 40 and summary["models_a"] == 1 and summary["models_b"] == 2
    assert summary["accuracy_a"] == pytest.approx(rows[0]["accuracy"])
    # the group's accuracy is the mean of its members' accuracies
    assert summary["accuracy_b"] == pytest.approx((rows[1]["accuracy"] + rows[2]["accuracy"]) / 2)
    assert summary["difference_b_minus_a"] == pytest.approx(summary["accuracy_b"] - summary["accuracy_a"])
    assert summary["ci95_low"] <= summary["difference_b_minus_a"] <= summary["ci95_high"]


def test_single_models_only_counts_match_difference(models):
    out = json.loads(_compare("--a", models[0], "--b", models[1]).stdout)["summary"]
    # with one model per side, B - A is exactly (only B right - only A right) / pairs
    assert out["difference_b_minus_a"] == pytest.approx((out["only_b_right"] - out["only_a_right"]) / out["pairs"])
    same = json.loads(_compare("--a", models[0], "--b", models[0]).stdout)["summary"]
    assert same["difference_b_minus_a"] == 0 and same["only_a_right"] == same["only_b_right"] == 0


def test_min_gain_gate_exit_1_keeps_json(models):
    result = _compare("--a", models[0], "--b", models[0], "--min-gain", "0.01")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["summary"]["gate"] == "FAIL"
    assert "--min-gain" in result.stderr and "Traceback" not in result.output


def test_missing_model_exit_2(models, tmp_path):
    result = _compare("--a", models[0], "--b", tmp_path / "missing.pt")
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "missing.pt does not exist" in lines[0]
