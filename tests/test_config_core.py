"""The config core: options generated from the config fields (help and defaults shown), a config
that knows which values were set and by whom, and no "equal to the default" guesses anywhere."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from shrinkcli.cli import app
from shrinkcli.config import STAGE_CONFIGS, DistillConfig, TeacherConfig
from shrinkcli.stages.pipeline import PIPELINE_STAGES
from shrinkcli.stages.registry import STAGES

runner = CliRunner()
TINY_TEACHER = ["--arch", "r18", "--width", "0.125", "--input-size", "32", "--embedding-size", "16",
                "--data", "synthetic:8:4:0", "--batch-size", "8", "--set", "workers=0", "--set", "device=cpu"]


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_every_config_field_is_an_option_with_help_and_its_default_shown(stage):
    command = typer.main.get_command(app).commands[stage]
    by_name = {p.name: p for p in command.params}
    for field in dataclasses.fields(STAGE_CONFIGS[stage]):
        assert field.metadata.get("help"), f"{stage}.{field.name} has no help text"
        assert field.name in by_name, f"{stage}.{field.name} has no option"
        param = by_name[field.name]
        assert param.help, f"{stage} --{field.name} shows no help"
        if param.param_type_name == "option":
            assert param.show_default not in (None, False, True), f"{stage} --{field.name} shows no default"
    result = runner.invoke(app, [stage, "--help"])
    assert result.exit_code == 0 and "[default:" in result.output


def test_every_stage_has_one_entry_taking_config_and_run_options():
    import inspect

    assert set(PIPELINE_STAGES) <= set(STAGES) and set(STAGES) == set(STAGE_CONFIGS)
    for name, entry in STAGES.items():
        assert list(inspect.signature(entry).parameters)[:2] in (["config", "run"], ["config", "options"]), name
        assert all(p.default is not inspect.Parameter.empty
                   for p in list(inspect.signature(entry).parameters.values())[2:]), name


def test_a_config_knows_who_set_each_field(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[common]\nlr = 0.2\n[distill]\nepochs = 3\n')
    from shrinkcli.app import _build_config

    config = _build_config("distill", recipe, {"batch_size": "16", "width": None}, ["seed=4"])
    assert config.sources == {"lr": "recipe", "epochs": "recipe", "batch_size": "option", "seed": "--set"}
    assert config.is_set("epochs") and not config.is_set("width") and not config.is_set("input_size")
    assert DistillConfig().sources == {} and DistillConfig(epochs=10).source("epochs") == "python"
    assert config.replace(source="teacher", crop=144).source("crop") == "teacher"


def _epochs_trained(run_dir: Path) -> int:
    return json.loads((run_dir / "manifest.json").read_text())["results"]["epochs"]


def test_resume_with_epochs_equal_to_the_default_trains_to_that_many_epochs(tmp_path):
    run_dir = tmp_path / "t"
    first = runner.invoke(app, ["teacher", *TINY_TEACHER, "--epochs", "1", "--run-dir", str(run_dir)])
    assert first.exit_code == 0, first.output
    assert _epochs_trained(run_dir) == 1
    default_epochs = TeacherConfig().epochs
    again = runner.invoke(app, ["teacher", "--resume", str(run_dir), "--epochs", str(default_epochs)])
    assert again.exit_code == 0, again.output
    assert _epochs_trained(run_dir) == default_epochs


def test_resume_without_epochs_keeps_the_checkpoints(tmp_path):
    run_dir = tmp_path / "t"
    assert runner.invoke(app, ["teacher", *TINY_TEACHER, "--epochs", "1", "--run-dir", str(run_dir)]).exit_code == 0
    again = runner.invoke(app, ["teacher", "--resume", str(run_dir)])
    assert again.exit_code == 0, again.output
    assert _epochs_trained(run_dir) == 1


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher") / "t"
    result = runner.invoke(app, ["teacher", *TINY_TEACHER, "--epochs", "1", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    return run_dir


def test_explicit_input_size_other_than_the_teachers_is_exit_2(tiny_teacher, tmp_path):
    for value in ("64", "112"):       # 112 is the default: set explicitly, it still counts
        result = runner.invoke(app, ["distill", "--teacher", str(tiny_teacher), "--data", "synthetic:8:4:0",
                                     "--input-size", value, "--run-dir", str(tmp_path / value)])
        assert result.exit_code == 2, result.output
        assert "differs from the teacher's 32" in result.stderr and "Traceback" not in result.output


def test_teacher_load_with_an_explicit_arch_of_another_depth_is_exit_2(tiny_teacher, tmp_path):
    checkpoint = tiny_teacher / "weights" / "last.pt"
    result = runner.invoke(app, ["teacher", "--load", str(checkpoint), "--arch", "r90",
                                 "--run-dir", str(tmp_path / "imp")])
    assert result.exit_code == 2, result.output
    assert "does not fit r90" in result.stderr and "Traceback" not in result.output
    inferred = runner.invoke(app, ["teacher", "--load", str(checkpoint), "--run-dir", str(tmp_path / "ok")])
    assert inferred.exit_code == 0, inferred.output


def test_global_options_after_the_command_mean_the_same(tiny_teacher):
    weights = str(tiny_teacher / "model.safetensors")
    before = runner.invoke(app, ["--json", "models", "--filter", "r18", "--input-size", "32"])
    after = runner.invoke(app, ["models", "--filter", "r18", "--input-size", "32", "--json"])
    assert before.exit_code == after.exit_code == 0
    assert json.loads(before.stdout) == json.loads(after.stdout)
    quiet = runner.invoke(app, ["info", "-q", "--json"])
    assert quiet.exit_code == 0 and json.loads(quiet.stdout)["summary"]["threads"] >= 1
    assert Path(weights).is_file()


def test_staleness_asks_what_was_set_not_what_equals_the_default():
    from shrinkcli.stages.staleness import _same_config

    saved = TeacherConfig(epochs=3).to_dict()
    saved.pop("channel_order")                      # a run that predates this key
    assert _same_config(saved, TeacherConfig.from_dict({"epochs": 3}))
    assert not _same_config(saved, TeacherConfig.from_dict({"epochs": 3, "channel_order": "RGB"}))
