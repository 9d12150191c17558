"""The objectives beyond ShrinkTeaNet through the CLI: teacher-centre margin head, similarity-preserving
and EKD rank distillation, each distilling a tiny student for a few steps on synthetic data."""

import json

import pytest
import torch
from typer.testing import CliRunner

from shrinkcli.cli import app
from shrinkcli.engine.checkpoint import load_checkpoint
from shrinkcli.models import create_model

SIZE = 32
DATA = "synthetic:4:4"
runner = CliRunner()


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A teacher run with its own CosFace classifier, trained on DATA."""
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    result = runner.invoke(app, ["--json", "teacher", "--arch", "r18", "--width", "0.125", "--input-size", str(SIZE),
                                 "--embedding-size", "32", "--data", DATA, "--epochs", "1", "--batch-size", "8",
                                 "--head", "cosface", "--set", "workers=0", "--set", "device=cpu",
                                 "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture(scope="module")
def bare_teacher(tmp_path_factory):
    """A teacher file without any classifier beside it (as an imported backbone would be)."""
    from _helpers import tiny_teacher_file

    return tiny_teacher_file(tmp_path_factory.mktemp("bare"), size=SIZE)


def distill(tmp_path, teacher, name, *options):
    args = ["--json", "distill", "--teacher", str(teacher), "--data", DATA, "--width", "0.25",
            "--embedding-size", "32", "--epochs", "1", "--batch-size", "8", "--head", "cosface",
            "--stage-loss", "none", "--run-dir", str(tmp_path / name),
            "--set", "workers=0", "--set", "device=cpu", "--set", "log_every=1", "--set", "scale=16", *options]
    return runner.invoke(app, args)


def steps_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"step"' in line and "loss" in line]


def test_teacher_centres_inherit_the_teacher_classifier(tmp_path, teacher_run):
    result = distill(tmp_path, teacher_run, "inherit", "--set", "head_centres=teacher", "--embed-loss", "none")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["steps"] == 2
    teacher_head = load_checkpoint(teacher_run / "weights" / "last.pt")["modules"]["head"]["weight"]
    student_head = load_checkpoint(tmp_path / "inherit" / "weights" / "last.pt")["modules"]["head"]
    assert torch.equal(student_head["weight"], teacher_head.float()) and bool(student_head["filled"])
    assert all("margin" in r for r in steps_of(tmp_path / "inherit"))
    # forcing the classifier from a bare teacher is a clear input error, not a traceback
    forced = distill(tmp_path, teacher_run / "model.safetensors", "other-data", "--data", "synthetic:5:4",
                     "--set", "head_centres=teacher-classifier")
    assert forced.exit_code == 2 and "trained on" in forced.stderr and "Traceback" not in forced.output


def test_teacher_mean_centres_cached_and_inline_agree(tmp_path, bare_teacher):
    inline = distill(tmp_path, bare_teacher, "inline", "--set", "head_centres=teacher", "--no-cache-teacher")
    cached = distill(tmp_path, bare_teacher, "cached", "--set", "head_centres=teacher-mean", "--cache-teacher")
    assert inline.exit_code == 0, inline.output
    assert cached.exit_code == 0, cached.output
    assert json.loads(cached.stdout)["summary"]["teacher_forward_steps"] == 0
    a = load_checkpoint(tmp_path / "inline" / "weights" / "last.pt")
    b = load_checkpoint(tmp_path / "cached" / "weights" / "last.pt")
    centres = a["modules"]["head"]["weight"]
    assert centres.shape == (4, 32) and torch.allclose(centres.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(centres, b["modules"]["head"]["weight"], atol=1e-6)
    worst = max(float((a["model"][k].float() - b["model"][k].float()).abs().max()) for k in a["model"])
    assert worst < 1e-5, f"cached and inline teacher-centre runs differ by {worst}"


def test_teacher_centres_with_a_smaller_student_and_partial_fc(tmp_path, bare_teacher):
    result = distill(tmp_path, bare_teacher, "small", "--embedding-size", "16", "--set", "head_centres=teacher",
                     "--set", "sample_rate=0.5")
    assert result.exit_code == 0, result.output
    head = load_checkpoint(tmp_path / "small" / "weights" / "last.pt")["modules"]["head"]
    assert head["adapter.weight"].shape == (32, 16) and head["weight"].shape == (4, 32)


@pytest.mark.parametrize("labels", ["--labels", "--no-labels"])
@pytest.mark.parametrize("objective", ["similarity_weight=3000", "ekd_weight=1"])
def test_relational_objectives_distill_with_and_without_labels(tmp_path, bare_teacher, objective, labels):
    result = distill(tmp_path, bare_teacher, "rel", labels, "--embed-loss", "none", "--cache-teacher",
                     "--set", objective, "--set", "ekd_topk=20")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["summary"]
    assert summary["teacher_forward_steps"] == 0 and summary["steps"] == 2
    term = "distill_sim" if objective.startswith("similarity") else "distill_ekd"
    rows = steps_of(tmp_path / "rel")
    assert rows and all(term in r and r[term] == r[term] for r in rows)          # logged, not NaN
    assert all(("margin" in r) == (labels == "--labels") for r in rows)
    state = load_checkpoint(tmp_path / "rel" / "weights" / "last.pt")
    if term == "distill_ekd":       # the moving thresholds are part of the training state
        assert state["modules"]["relational"]["ekd.teacher_thresholds"].abs().sum() > 0


def test_all_objectives_compose_with_embedding_and_stage_terms(tmp_path, teacher_run):
    result = distill(tmp_path, teacher_run, "all", "--stage-loss", "angular", "--embed-loss", "angular",
                     "--set", "head_centres=teacher", "--set", "similarity_weight=3000", "--set", "ekd_weight=1")
    assert result.exit_code == 0, result.output
    rows = steps_of(tmp_path / "all")
    assert {"margin", "distill_emb", "distill_s1", "distill_sim", "distill_ekd"} <= set(rows[-1])


def test_objective_settings_are_checked(tmp_path, bare_teacher):
    no_labels = distill(tmp_path, bare_teacher, "bad1", "--no-labels", "--set", "head_centres=teacher")
    assert no_labels.exit_code == 2 and "needs identity labels" in no_labels.stderr
    bad_fpr = distill(tmp_path, bare_teacher, "bad2", "--set", "ekd_weight=1", "--set", "ekd_fprs=0.5,2")
    assert bad_fpr.exit_code == 2 and "ekd_fprs" in bad_fpr.stderr


@pytest.mark.parametrize("recipe", ["lfw-half-cpu.toml", "lfw-half-val-cpu.toml"])
def test_recipe_variants_are_valid_distill_configs(recipe):
    from pathlib import Path

    from shrinkcli.config import load_recipe, stage_config_from_recipe

    data = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / recipe)
    built = {name: stage_config_from_recipe({**data, "distill": {**data["distill"], **changes}}, "distill", name)
             for name, changes in data["experiment"]["variants"].items()}
    assert built["centres"].head_centres == "teacher" and built["ekd"].ekd_weight == 1.0
    assert built["similarity"].similarity_weight == 3000.0


def test_fixed_centre_head_is_not_handed_to_ddp_but_an_adapter_head_is():
    from shrinkcli.distill import DistillTask
    from shrinkcli.losses.centres import TeacherCentreHead
    from shrinkcli.losses.distill import DistillCriterion

    teacher = create_model("r18", embedding_size=32, input_size=SIZE, width=0.125)
    wrapped = []
    for student_dim, expect_wrapped in ((32, False), (16, True)):
        student = create_model("mobilefacenet", embedding_size=student_dim, input_size=SIZE, width=0.25)
        criterion = DistillCriterion(student_channels=student.stage_channels, teacher_channels=teacher.stage_channels,
                                     student_embedding=student_dim, teacher_embedding=32)
        head = TeacherCentreHead(student_dim, 32, 4)
        task = DistillTask(student=student, teacher=teacher, criterion=criterion, head=head)
        wrapped.clear()
        task.distribute(lambda module: wrapped.append(module) or module)
        assert (head in wrapped) == expect_wrapped and len(wrapped) == 1 + expect_wrapped
