"""Every config field of every stage, given hostile values through the CLI: a value that is the
wrong type, non-finite or out of its declared range is refused naming the key (exit 2) before any
work; a value that is valid never crashes the stage (each command lacks its main input, so it
stops with exit 2 instead of training). Never a traceback, never exit 3."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import typer.testing
from typer.testing import CliRunner

from shrinkcli.cli import app
from shrinkcli.config import STAGE_CONFIGS
from shrinkcli.fields import check_bounds, coerce
from shrinkcli.errors import BadInputError

runner = CliRunner()
HOSTILE = ["nan", "-inf", "0", "-1", "x", "1e30", str(10**30)]


@pytest.fixture
def fast_app(monkeypatch):
    """Build the click command once: rebuilding it per call is most of a call's time here."""
    command = typer.testing._get_command(app)
    monkeypatch.setattr(typer.testing, "_get_command", lambda _app: command)


def _invalid(cls, name: str, value: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    try:
        parsed = coerce(value, typing.get_type_hints(cls)[name], name)
        check_bounds(name, parsed, f.metadata.get("bounds") or {}, "x")
    except BadInputError:
        return True
    return False


def _command(stage: str, tmp_path) -> list[str]:
    # no --data / --teacher / --model / --run: a stage that accepts the value stops at its missing input
    if stage == "embed":        # its model is an argument: one that does not exist
        return [stage, str(tmp_path / "absent.onnx")]
    return [stage, "--project", str(tmp_path)]


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_every_field_with_hostile_values_is_exit_2_and_never_a_crash(stage, tmp_path, fast_app):
    cls = STAGE_CONFIGS[stage]
    refused = 0
    for f in dataclasses.fields(cls):
        for value in HOSTILE:
            result = runner.invoke(app, [*_command(stage, tmp_path), "--set", f"{f.name}={value}"])
            where = f"{stage} --set {f.name}={value}"
            assert result.exit_code == 2, f"{where}: exit {result.exit_code}: {result.output}"
            assert "Traceback" not in result.output and "internal error" not in result.output, where
            line = result.stderr.strip().splitlines()[-1]
            assert line.startswith("shrink: error:"), f"{where}: {result.stderr}"
            if _invalid(cls, f.name, value):
                assert f.name in line, f"{where} was not refused by name: {line}"
                refused += 1
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a refused command wrote files"
    assert refused > len(dataclasses.fields(cls))       # most fields refuse most hostile values


@pytest.mark.parametrize("args, needle", [
    (["verify", "--model", "absent.onnx", "--min-accuracy", "75"], "min_accuracy=75.0 is out of range"),
    (["verify", "--model", "absent.onnx", "--set", "max_gap=2"], "max_gap=2.0 is out of range"),
    (["teacher", "--data", "synthetic:8:4:0", "--set", "workers=-1"], "workers=-1 is out of range"),
    (["teacher", "--data", "synthetic:8:4:0", "--batch-size", "0"], "batch_size=0 is out of range"),
    (["teacher", "--data", "synthetic:8:4:0", "--set", "sample_rate=1.5"], "sample_rate=1.5 is out of range"),
    (["teacher", "--data", "synthetic:8:4:0", "--set", "seed=-3"], "seed=-3 is out of range"),
    (["distill", "--teacher", "absent", "--set", "stage_weights=1,1,-1,1"], "stage_weights=-1.0 is out of range"),
    (["export", "--weights", "absent.safetensors", "--set", "opset=99"], "opset=99"),
    (["export", "--weights", "absent.safetensors", "--set", "opset=11"], "opset=11 is out of range"),
    (["teacher", "--data", "synthetic:8:4:0", "--name", "../escape"], "not usable as a folder name"),
    (["teacher", "--data", "synthetic:8:4:0", "--name", ".hidden"], "not usable as a folder name"),
])
def test_out_of_range_values_are_refused_before_work(args, needle, tmp_path):
    result = runner.invoke(app, [*args, "--project", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr.strip().splitlines()[-1], result.stderr
    assert "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


EXPERIMENT = """
[teacher]
arch = "r18"
width = 0.125
input_size = 32
embedding_size = 16
data = "synthetic:8:4:0"
epochs = 1
batch_size = 8
workers = 0
device = "cpu"
[distill]
width = 0.25
embedding_size = 16
data = "synthetic:8:4:0"
epochs = 1
batch_size = 8
workers = 0
[experiment]
pairs = "pairs:8"
{extra}
[experiment.variants.baseline]
embed_loss = "angular"
{variant}
"""


@pytest.mark.parametrize("extra, variant, needle", [
    ("seeds = []", "", "seeds must be a non-empty list"),
    ("seeds = [0, 0]", "", "repeat a seed"),
    ('seeds = ["a"]', "", "seeds must be a non-empty list"),
    ("seeds = [0]\nbootstrap = 0", "", "bootstrap must be an integer"),
    ("seeds = [0]", '[experiment.variants."../out"]\nembed_loss = "none"', "not usable as a folder name"),
    ("seeds = [0]", "[experiment.variants.v2]\nembed_los = \"none\"", "unknown key(s) embed_los"),
    ("seeds = [0]", "[experiment.variants.v2]\nembed_weight = -1", "embed_weight=-1.0 is out of range"),
    ('seeds = [0]\nonly = ["nope"]', "", "only names unknown variant(s) nope"),
    ('seeds = [0]\nonly = ["v2"]', "[experiment.variants.v2]\nembed_weight = 2", "only leaves out the baseline"),
    ("seeds = [0]\nonly = []", "", "only must be a non-empty list"),
])
def test_experiment_tables_are_checked_before_the_teacher_trains(extra, variant, needle, tmp_path):
    recipe = tmp_path / "study.toml"
    recipe.write_text(EXPERIMENT.format(extra=extra, variant=variant))
    parent = tmp_path / "study"
    result = runner.invoke(app, ["pipeline", str(recipe), "--run-dir", str(parent)])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr.strip().splitlines()[-1], result.stderr
    assert "Traceback" not in result.output
    assert not parent.exists() and not (tmp_path / "out").exists()     # nothing trained, nothing written
