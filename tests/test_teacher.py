import json

import pytest
import torch
from typer.testing import CliRunner

from shrinkcli.cli import app
from shrinkcli.config import TeacherConfig
from shrinkcli.engine.checkpoint import load_checkpoint
from shrinkcli.errors import BadInputError, GateFailedError
from shrinkcli.models import create_model
from shrinkcli.models.io import load_model
from shrinkcli.rundir import RunOptions, load_manifest, resolve_artifact
from shrinkcli.stages import teacher

TINY = dict(arch="r18", width=0.125, input_size=32, embedding_size=32, data="synthetic:4:4", batch_size=8,
            epochs=2, workers=0, device="cpu", log_every=1, lr=0.05)


def tiny_config(**changes):
    return TeacherConfig(**{**TINY, **changes})


def test_training_writes_resumable_checkpoints_and_a_loadable_teacher(tmp_path):
    config = tiny_config(val="pairs:24@synthetic:4:4:1", head="cosface", scale=16.0)
    result = teacher.run(config, RunOptions(run_dir=str(tmp_path / "t")))
    run_dir = tmp_path / "t"
    summary = result["summary"]
    assert summary["steps"] == 2 * (16 // 8) and 0.0 <= summary["val_accuracy"] <= 1.0
    manifest = load_manifest(run_dir)
    kinds = {o["kind"] for o in manifest["outputs"]}
    assert {"checkpoint", "best_checkpoint", "weights", "metrics"} <= kinds
    assert manifest["status"] == "completed" and manifest["inputs"][0]["identities"] == 4
    model, meta = load_model(resolve_artifact(run_dir, "weights").path)
    assert meta["arch"] == "r18" and meta["preprocess"]["input_size"] == 32
    state = load_checkpoint(run_dir / "weights" / "last.pt")
    assert state["modules"]["head"]["weight"].shape == (4, 32)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    # a full training checkpoint is also a teacher the model loader accepts
    from_ckpt, _ = load_model(run_dir / "weights" / "last.pt")
    assert from_ckpt.arch == "r18"


def test_resume_continues_in_the_same_run_dir_with_the_saved_config(tmp_path):
    run_dir = tmp_path / "t"
    teacher.run(tiny_config(max_steps=3), RunOptions(run_dir=str(run_dir)))
    assert load_checkpoint(run_dir / "weights" / "last.pt")["step"] == 3
    # like `shrink teacher --resume DIR`: the CLI's defaults must not replace the saved settings
    result = teacher.run(TeacherConfig(workers=0, device="cpu"), RunOptions(resume=str(run_dir)))
    assert result["run_dir"] == str(run_dir) and result["summary"]["steps"] == 4
    manifest = load_manifest(run_dir)
    assert manifest["status"] == "completed" and manifest["config"]["arch"] == "r18"
    assert manifest["results"]["resumes"][0]["step"] == 3
    assert not (tmp_path / "runs").exists()


def test_import_insightface_backbone_infers_arch_and_checks_embeddings(tmp_path):
    torch.manual_seed(0)
    source = create_model("r18", width=0.125, input_size=32, embedding_size=32).eval()
    pth = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), pth)
    result = teacher.run(TeacherConfig(load=str(pth), data="synthetic:4:2"), RunOptions(run_dir=str(tmp_path / "imp")))
    summary = result["summary"]
    assert summary["arch"] == "r18" and summary["check_images"] >= 2 and summary["embedding_spread"] > 0
    model, meta = load_model(resolve_artifact(tmp_path / "imp", "weights").path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), source(x), atol=1e-5)
    inputs = load_manifest(tmp_path / "imp")["inputs"]
    assert inputs[0]["kind"] == "weights" and inputs[0]["sha256"] == meta["metadata"]["imported_sha256"]


def test_import_refuses_constant_outputs_and_conflicting_options(tmp_path):
    model = create_model("r18", width=0.125, input_size=32, embedding_size=32)
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    pth = tmp_path / "zero.pth"
    torch.save(model.state_dict(), pth)
    with pytest.raises(GateFailedError, match="same embedding"):
        teacher.run(TeacherConfig(load=str(pth)), RunOptions(run_dir=str(tmp_path / "z")))
    with pytest.raises(BadInputError, match="exclude each other"):
        teacher.run(TeacherConfig(load=str(pth)), RunOptions(resume=str(tmp_path)))
    with pytest.raises(BadInputError, match="no training data"):
        teacher.run(TeacherConfig(), RunOptions(run_dir=str(tmp_path / "none")))


def test_cli_teacher_json(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["--json", "teacher", "--arch", "r18", "--width", "0.125", "--input-size", "32",
                                 "--embedding-size", "16", "--data", "synthetic:4:4", "--epochs", "1",
                                 "--batch-size", "8", "--head", "arcface", "--sample-rate", "0.5",
                                 "--set", "workers=0", "--set", "device=cpu",
                                 "--run-dir", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["summary"]["steps"] == 2 and (tmp_path / "cli" / "model.safetensors").is_file()
