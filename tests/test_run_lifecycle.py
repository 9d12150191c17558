"""The run-dir lifecycle through the CLI: every exit path marks the manifest with what ended it, a
refused resume leaves the manifest alone, inputs are checked against their recorded sha256, runs
that did not complete are refused as inputs, a run dir in use is locked, and the pipeline keeps out
of folders it did not create."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shrinkcli.cli import app

runner = CliRunner()
TINY = ["--arch", "r18", "--input-size", "32", "--width", "0.125", "--embedding-size", "16",
        "--batch-size", "8", "--device", "cpu", "--set", "workers=0", "--epochs", "1"]
DATA = ["--data", "synthetic:8:4:0"]
STUDENT = ["--width", "0.25", "--embedding-size", "16", "--batch-size", "8", "--device", "cpu",
           "--set", "workers=0", "--epochs", "1", "--set", "max_steps=1"]


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def _clean_exit(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lifecycle") / "teacher"
    result = runner.invoke(app, ["teacher", *TINY, *DATA, "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.mark.parametrize("batch, needle", [("2", "0.jpg"), ("8", "fewer than one global batch")])
def test_bad_data_found_after_the_run_dir_exists_marks_it_failed_with_the_error(tmp_path, batch, needle):
    root = tmp_path / "faces"
    for identity in ("a", "b"):
        (root / identity).mkdir(parents=True)
        (root / identity / "0.jpg").write_bytes(b"not a jpeg at all")
    run_dir = tmp_path / "run"
    line = _clean_exit(runner.invoke(app, ["teacher", *TINY, "--batch-size", batch, "--data", f"folder:{root}",
                                           "--run-dir", str(run_dir)]), 2)
    assert needle in line
    manifest = _manifest(run_dir)     # both are found once the run dir exists (images decode while training)
    assert manifest["status"] == "failed" and manifest["error"] in line


def test_a_failure_inside_a_stage_marks_the_manifest_failed_with_the_error_line(teacher_dir, tmp_path):
    # distill opens its run dir, then cannot create the teacher cache below a regular file: a
    # refusal after the run dir was made, before the first step.
    (tmp_path / "afile").write_text("x")
    run_dir = tmp_path / "d"
    result = runner.invoke(app, ["distill", "--teacher", str(teacher_dir), *DATA, *STUDENT, "--cache-teacher",
                                 "--set", f"cache_dir={tmp_path / 'afile' / 'sub'}", "--run-dir", str(run_dir)])
    line = _clean_exit(result, 2)
    assert "cannot create the teacher cache" in line
    manifest = _manifest(run_dir)
    assert manifest["status"] == "failed", manifest["status"]
    assert manifest["error"] and manifest["error"] in line
    assert manifest["finished"]


def test_a_refused_resume_leaves_a_completed_manifest_completed(teacher_dir):
    before = (teacher_dir / "manifest.json").read_bytes()
    line = _clean_exit(runner.invoke(app, ["teacher", "--resume", str(teacher_dir), "--data",
                                           f"folder:{teacher_dir / 'absent'}"]), 2)
    assert "absent" in line
    assert (teacher_dir / "manifest.json").read_bytes() == before
    assert _manifest(teacher_dir)["status"] == "completed"


def test_distill_resume_after_the_teacher_was_retrained_in_place_is_refused(tmp_path):
    teacher = tmp_path / "teacher"
    student = tmp_path / "student"
    assert runner.invoke(app, ["teacher", *TINY, *DATA, "--run-dir", str(teacher)]).exit_code == 0
    first = runner.invoke(app, ["distill", "--teacher", str(teacher), *DATA, *STUDENT, "--run-dir", str(student)])
    assert first.exit_code == 0, first.output
    retrain = runner.invoke(app, ["teacher", *TINY, *DATA, "--seed", "1", "--run-dir", str(teacher), "--exist-ok"])
    assert retrain.exit_code == 0, retrain.output
    before = (student / "manifest.json").read_bytes()
    line = _clean_exit(runner.invoke(app, ["distill", "--resume", str(student), "--epochs", "2",
                                           "--set", "max_steps=2"]), 2)
    assert "changed since the run used it" in line and "teacher" in line
    assert (student / "manifest.json").read_bytes() == before


def test_an_input_run_that_did_not_complete_is_refused_unless_allowed(teacher_dir, tmp_path):
    broken = tmp_path / "teacher-failed"
    broken.mkdir()
    for name in ("model.safetensors",):
        (broken / name).write_bytes((teacher_dir / name).read_bytes())
    manifest = _manifest(teacher_dir)
    manifest.update(status="failed", outputs=[r for r in manifest["outputs"] if r["kind"] == "weights"])
    (broken / "manifest.json").write_text(json.dumps(manifest))
    line = _clean_exit(runner.invoke(app, ["distill", "--teacher", str(broken), *DATA, *STUDENT,
                                           "--run-dir", str(tmp_path / "d")]), 2)
    assert "'failed', not completed" in line and "allow_incomplete" in line
    allowed = runner.invoke(app, ["distill", "--teacher", str(broken), *STUDENT, "--set", "allow_incomplete=true",
                                  "--run-dir", str(tmp_path / "d2")])
    assert "no training data" in _clean_exit(allowed, 2)      # past the teacher: stopped by the missing --data


def test_a_run_dir_in_use_by_another_process_is_exit_2(tmp_path):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    # flock conflicts between open file descriptions, so this holds it as another process would
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = _clean_exit(runner.invoke(app, ["teacher", *TINY, *DATA, "--run-dir", str(run_dir),
                                               "--exist-ok"]), 2)
        assert "in use by another shrink process" in line
        assert not (run_dir / "manifest.json").exists()
    finally:
        os.close(fd)


def test_pipeline_refuses_a_folder_it_did_not_create(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    line = _clean_exit(runner.invoke(app, ["pipeline", "--run-dir", str(folder)]), 2)
    assert "not created by `shrink pipeline`" in line and "--exist-ok" in line
    assert (folder / "notes.txt").read_text() == "keep me" and sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_export_of_a_manifest_entry_without_sha256_is_exit_2(teacher_dir, tmp_path):
    copy = tmp_path / "t"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((teacher_dir / "model.safetensors").read_bytes())
    manifest = _manifest(teacher_dir)
    manifest["outputs"] = [{"path": "model.safetensors", "kind": "weights"}]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    line = _clean_exit(runner.invoke(app, ["export", "--run", str(copy), "--run-dir", str(tmp_path / "e")]), 2)
    assert "no path or no sha256" in line
    assert not (tmp_path / "e").exists()


def test_files_follow_the_umask_and_stale_temps_are_removed_when_the_dir_is_taken(teacher_dir, tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("manifest.json", "model.safetensors", "weights/last.pt"):
        assert (teacher_dir / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    run_dir = tmp_path / "e"
    (run_dir / "weights").mkdir(parents=True)
    left = [run_dir / ".manifest.json.k9x.tmp", run_dir / "weights" / ".last.pt.a1b.tmp"]
    for path in left:
        path.write_bytes(b"half a file")
    (run_dir / ".shrink-tmp-int8-q7").mkdir()
    (run_dir / "mine.txt").write_text("kept")
    result = runner.invoke(app, ["export", "--weights", str(teacher_dir / "model.safetensors"), "--format",
                                 "safetensors", "--run-dir", str(run_dir), "--exist-ok"])
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in left) and not (run_dir / ".shrink-tmp-int8-q7").exists()
    assert (run_dir / "mine.txt").read_text() == "kept"
    assert not [p.name for p in run_dir.rglob("*") if p.name.startswith(".") and p.name != ".lock"]


def test_a_decompression_bomb_warning_is_shrinks_own_error_line(tmp_path, monkeypatch):
    from PIL import Image

    root = tmp_path / "faces"
    for identity in ("a", "b"):
        (root / identity).mkdir(parents=True)
        Image.new("RGB", (64, 64), (120, 80, 40)).save(root / identity / "0.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)    # 4096 pixels: over the limit, under twice it
    line = _clean_exit(runner.invoke(app, ["teacher", *TINY, "--batch-size", "2", "--data", f"folder:{root}",
                                           "--run-dir", str(tmp_path / "run")]), 2)
    assert "decompression bomb" in line and "0.png" in line
