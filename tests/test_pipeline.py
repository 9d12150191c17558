"""The quickstart pipeline end to end at a reduced size: artifacts, hash chain, skipping, re-running."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shrinkcli.atomic import sha256_file
from shrinkcli.cli import app

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "common.data=synthetic:8:6:0", "common.val=pairs:60@synthetic:8:4:1", "common.input_size=32",
    "common.batch_size=16", "common.log_every=2", "teacher.width=0.125", "teacher.epochs=1",
    "distill.epochs=1", "distill.width=0.25", "verify.data=synthetic:8:4:1",
    "verify.pairs=pairs:60@synthetic:8:4:1", "verify.min_accuracy=0.0", "verify.latency_seconds=0",
    "export.format=onnx",
]


def _pipeline(tmp_path, *extra):
    args = ["--json", "pipeline", str(REPO / "recipes" / "quickstart.toml"), "--project", str(tmp_path)]
    for item in (*TINY, *extra):
        args += ["--set", item]
    return CliRunner().invoke(app, args)


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _output(manifest: dict, kind: str) -> dict:
    return next(r for r in manifest["outputs"] if r["kind"] == kind)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pipeline")
    result = _pipeline(tmp_path)
    assert result.exit_code == 0, result.output
    return tmp_path, json.loads(result.stdout)


def test_every_stage_writes_its_artifacts(finished):
    root, result = finished
    parent = Path(result["run_dir"])
    assert parent == root / "pipeline" / "quickstart"
    for stage, files in {
        "teacher": ["model.safetensors", "weights/last.pt", "metrics.jsonl"],
        "distill": ["model.safetensors", "weights/last.pt", "metrics.jsonl"],
        "export": ["model.onnx"],
        "verify": ["report.json", "report.md", "roc.png"],
    }.items():
        manifest = _manifest(parent / stage)
        assert manifest["status"] == "completed", stage
        for name in files:
            assert (parent / stage / name).is_file(), f"{stage}/{name}"
        for record in manifest["outputs"]:
            assert sha256_file(parent / stage / record["path"]) == record["sha256"], f"{stage}: {record}"
    assert _manifest(parent)["status"] == "completed"


def test_manifests_form_a_hash_chain(finished):
    _, result = finished
    parent = Path(result["run_dir"])
    teacher, distill, export, verify = (_manifest(parent / s) for s in ("teacher", "distill", "export", "verify"))
    teacher_input = next(r for r in distill["inputs"] if r["kind"] == "teacher")
    assert teacher_input["sha256"] == _output(teacher, "weights")["sha256"]
    export_input = next(r for r in export["inputs"] if r["kind"] == "weights")
    assert export_input["sha256"] == _output(distill, "weights")["sha256"]
    verify_model = next(r for r in verify["inputs"] if r["kind"] == "model")
    assert verify_model["sha256"] == _output(export, "onnx")["sha256"]


def test_rerun_skips_up_to_date_and_reruns_what_changed(finished):
    root, result = finished
    parent = Path(result["run_dir"])
    before = {s: _manifest(parent / s)["started"] for s in ("teacher", "distill", "export")}
    again = _pipeline(root, "verify.folds=5")
    assert again.exit_code == 0, again.output
    actions = {row["stage"]: row["action"] for row in _manifest(parent)["results"]["stages"]}
    assert actions == {"teacher": "skipped (up to date)", "distill": "skipped (up to date)",
                       "export": "skipped (up to date)", "verify": "ran"}
    assert {s: _manifest(parent / s)["started"] for s in before} == before


def test_failed_gate_stops_with_exit_1(finished):
    root, _ = finished
    result = _pipeline(root, "verify.min_accuracy=0.999")
    assert result.exit_code == 1, result.output
    assert "gate" in result.stderr
    assert _manifest(Path(root) / "pipeline" / "quickstart")["status"] == "failed"


def test_options_added_later_at_their_default_keep_finished_runs_up_to_date(tmp_path):
    from shrinkcli.config import DistillConfig
    from shrinkcli.rundir import RunDir
    from shrinkcli.stages.staleness import stage_state

    config = DistillConfig(teacher="t.safetensors", data="synthetic:2:2:0")
    saved = config.to_dict()
    del saved["cache_dtype"]                       # a run finished before the option existed
    run = RunDir.create("distill", run_dir=tmp_path / "old", config=saved)
    run.finish()
    assert stage_state(tmp_path / "old", config) == "done"
    assert stage_state(tmp_path / "old", config.replace("test", cache_dtype="float32")) == "stale"
    assert stage_state(tmp_path / "old", config.replace("test", epochs=config.epochs + 1)) == "stale"
