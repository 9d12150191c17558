"""The distill stage end to end on tiny synthetic data: frozen teacher, loss goes down, resume, cache == inline."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from shrinkcli.config import DistillConfig
from shrinkcli.distill import CacheRequest, DistillTask, TeacherCache, cache_key
from shrinkcli.errors import BadInputError
from shrinkcli.losses.distill import DistillCriterion
from shrinkcli.models import create_model
from shrinkcli.models.io import load_model
from shrinkcli.rundir import RunOptions
from shrinkcli.stages import distill as stage

SIZE = 32




@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    from _helpers import tiny_teacher_file

    return tiny_teacher_file(tmp_path_factory.mktemp("teacher"), size=SIZE)


def tiny_config(teacher_file, **changes):
    base = dict(teacher=str(teacher_file), data="synthetic:4:4:0", input_size=SIZE, width=0.25, embedding_size=32,
                batch_size=8, epochs=2, workers=0, lr=0.05, warmup_epochs=0.0, log_every=1, head="cosface",
                scale=16.0, embed_weight=5.0)
    base.update(changes)
    return DistillConfig.from_dict(base)


def run_stage(tmp_path, config, name, resume=None):
    return stage.run(config, RunOptions(project=str(tmp_path / "runs"), name=name, resume=resume))


def student_weights(run_dir):
    model, _ = load_model(run_dir / "model.safetensors")
    return model.state_dict()


def test_teacher_is_frozen_student_and_adapters_learn(teacher_file):
    teacher, _ = load_model(teacher_file)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = create_model("mobilefacenet", embedding_size=16, input_size=SIZE, width=0.25)
    criterion = DistillCriterion(student_channels=student.stage_channels, teacher_channels=teacher.stage_channels,
                                 student_embedding=16, teacher_embedding=32)
    task = DistillTask(student=student, teacher=teacher, criterion=criterion)
    params = [p for m in task.modules().values() for p in m.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for module in task.modules().values():
        module.train()
    teacher.train()     # a careless caller: the task must still evaluate the teacher in eval mode
    images = torch.randn(4, 3, SIZE, SIZE)
    for _ in range(2):
        optimizer.zero_grad()
        loss, logs = task.loss(images, torch.zeros(4, dtype=torch.long), torch.arange(4), None)
        loss.backward()
        optimizer.step()
    assert set(logs) >= {"distill", "distill_emb", "distill_s1", "distill_s4"}
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()), "teacher weights or BN stats changed"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert criterion.adapters.embedding.weight.grad.abs().sum() > 0          # 16 -> 32 embedding adapter
    assert all(s[0].weight.grad.abs().sum() > 0 for s in criterion.adapters.stages)


def test_end_to_end_lowers_distill_loss_and_writes_artifacts(tmp_path, teacher_file):
    config = tiny_config(teacher_file, labels=False, epochs=3, embedding_size=16, lr=0.1,
                         val="pairs:20@synthetic:4:2:1")
    result = run_stage(tmp_path, config, "e2e")
    run_dir = tmp_path / "runs" / "distill" / "e2e"
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = np.mean([r["distill"] for r in steps if r["epoch"] <= 1])
    last = np.mean([r["distill"] for r in steps if r["epoch"] > 2])
    assert last < first, f"distillation loss did not go down: {first:.4f} -> {last:.4f}"
    assert "margin" not in steps[0]                                   # --no-labels: teacher only
    manifest = json.loads((run_dir / "manifest.json").read_text())
    teacher_inputs = [r for r in manifest["inputs"] if r["kind"] == "teacher"]
    assert teacher_inputs and len(teacher_inputs[0]["sha256"]) == 64
    assert all({"path", "sha256"} <= set(r) for r in manifest["inputs"])
    assert manifest["results"]["data"]["images"] == 16 and manifest["results"]["preprocess"]["input_size"] == SIZE
    kinds = {r["kind"] for r in manifest["outputs"]}
    assert {"weights", "checkpoint"} <= kinds and manifest["status"] == "completed"
    with safe_open(str(run_dir / "model.safetensors"), "pt") as handle:
        meta = handle.metadata()
        keys = list(handle.keys())
    assert meta["shrink_arch"] == "mobilefacenet" and meta["teacher_sha256"] == teacher_inputs[0]["sha256"]
    assert json.loads(meta["preprocess"])["input_size"] == SIZE
    student, _ = load_model(run_dir / "model.safetensors")
    assert sorted(keys) == sorted(student.state_dict()) and student.embedding_size == 16   # no adapters, no head
    rows = result["tables"]["verification: teacher vs student"]
    assert [r["model"] for r in rows] == ["teacher", "student"] and 0.0 <= rows[1]["accuracy"] <= 1.0
    assert manifest["results"]["verification"][1]["model"] == "student"


def test_resume_continues_to_the_same_weights(tmp_path, teacher_file):
    run_stage(tmp_path, tiny_config(teacher_file, epochs=1), "full")
    run_stage(tmp_path, tiny_config(teacher_file, epochs=1, max_steps=1), "split")   # stops mid-epoch
    split_dir = tmp_path / "runs" / "distill" / "split"
    run_stage(tmp_path, tiny_config(teacher_file, epochs=1), "ignored", resume=str(split_dir))
    a, b = student_weights(tmp_path / "runs" / "distill" / "full"), student_weights(split_dir)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    manifest = json.loads((split_dir / "manifest.json").read_text())
    assert manifest["results"]["resumes"][0]["step"] == 1 and manifest["results"]["steps"] == 2
    assert not (tmp_path / "runs" / "distill" / "ignored").exists()     # a resumed run stays in its own dir


def test_cached_teacher_trains_exactly_like_inline(tmp_path, teacher_file):
    options = dict(stage_weights=[0.0, 0.0, 0.0, 0.0])       # embeddings are cached in float32
    inline = run_stage(tmp_path, tiny_config(teacher_file, **options), "inline")
    cached = run_stage(tmp_path, tiny_config(teacher_file, cache_teacher=True, **options), "cached")
    assert inline["summary"]["teacher_forward_steps"] == 4 and cached["summary"]["teacher_forward_steps"] == 0
    a = student_weights(tmp_path / "runs" / "distill" / "inline")
    b = student_weights(tmp_path / "runs" / "distill" / "cached")
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, f"cached and inline runs differ by {worst}"


def test_cached_stage_maps_match_inline_closely(tmp_path, teacher_file):
    inline = run_stage(tmp_path, tiny_config(teacher_file, epochs=1), "inline")
    cached = run_stage(tmp_path, tiny_config(teacher_file, epochs=1, cache_teacher=True), "cached")
    assert cached["summary"]["teacher_forward_steps"] == 0
    assert (tmp_path / "runs/distill/cached/teacher_cache/stage4.npy").is_file()
    a = student_weights(tmp_path / "runs" / "distill" / "inline")
    b = student_weights(tmp_path / "runs" / "distill" / "cached")
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-3, f"fp16 stage cache moved the weights by {worst}"
    assert abs(inline["summary"]["final_loss"] - cached["summary"]["final_loss"]) < 1e-2


def test_float32_stage_cache_trains_exactly_like_inline(tmp_path, teacher_file):
    inline = run_stage(tmp_path, tiny_config(teacher_file, epochs=1), "inline")
    cached = run_stage(tmp_path, tiny_config(teacher_file, epochs=1, cache_teacher=True, cache_dtype="float32"), "cached")
    assert cached["summary"]["teacher_forward_steps"] == 0 and inline["summary"]["teacher_forward_steps"] > 0
    assert np.load(tmp_path / "runs/distill/cached/teacher_cache/stage4.npy", mmap_mode="r").dtype == np.float32
    a = student_weights(tmp_path / "runs" / "distill" / "inline")
    b = student_weights(tmp_path / "runs" / "distill" / "cached")
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, f"float32 stage cache and inline runs differ by {worst}"


def test_cache_is_reused_and_invalidated(tmp_path, teacher_file):
    from shrinkcli.data import open_dataset
    from shrinkcli.distill.cache import open_or_build

    teacher, _ = load_model(teacher_file)
    dataset = open_dataset("synthetic:2:2:0", input_size=SIZE)
    calls = []

    def teacher_fn(images):
        calls.append(len(images))
        out = teacher.forward_features(images)
        return [s.detach() for s in out.stage_maps], out.embedding.detach()

    key = cache_key(teacher_sha256="a" * 64, data_spec="synthetic:2:2:0", num_items=4, labels=dataset.labels,
                    input_size=SIZE, crop=None, mean=127.5, std=127.5)
    args = dict(device=torch.device("cpu"), flips=2, with_stages=False, batch_size=4)
    first = open_or_build(tmp_path, key, dataset, teacher_fn, **args)
    assert calls == [4, 4]                                          # one batch, image + mirror
    again = open_or_build(tmp_path, key, dataset, teacher_fn, **args)
    assert calls == [4, 4] and torch.equal(first.embeddings, again.embeddings)
    with torch.no_grad():
        mirrored = teacher(torch.flip(torch.stack([dataset[i][0] for i in range(4)]), dims=[3]))
    _, looked_up = again.lookup(torch.tensor([2, 0]), torch.tensor([True, True]))
    torch.testing.assert_close(looked_up, mirrored[[2, 0]], atol=1e-5, rtol=1e-5)
    other = cache_key(teacher_sha256="a" * 64, data_spec="synthetic:2:2:0", num_items=4, labels=dataset.labels,
                      input_size=SIZE, crop=None, mean=127.5, std=128.0)
    assert other != key and TeacherCache.open(tmp_path, other, num_items=4, flips=2, with_stages=False) is None
    open_or_build(tmp_path, other, dataset, teacher_fn, **args)
    assert calls == [4, 4, 4, 4]                                    # mismatched key: recomputed
    assert TeacherCache.open(tmp_path, key, num_items=4, flips=2, with_stages=True) is None   # no stages stored
    staged = open_or_build(tmp_path / "s", key, dataset, teacher_fn, **{**args, "with_stages": True})
    assert staged.stage_maps[0].dtype == np.float16
    assert TeacherCache.open(tmp_path / "s", key, num_items=4, flips=2, with_stages=True, stage_dtype="float32") is None


def test_preprocessing_comes_from_the_teacher_unless_overridden():
    config = DistillConfig()
    resolved = stage.resolve_preprocess(config, {"mean": 127.5, "std": 128.0, "crop": 144}, 64)
    assert (resolved.input_size, resolved.crop, resolved.std) == (64, 144, 128.0)
    mine = stage.resolve_preprocess(DistillConfig(crop=150), {"crop": 144}, 112)
    assert mine.crop == 150
    with pytest.raises(BadInputError, match="differs from the teacher"):
        stage.resolve_preprocess(DistillConfig(input_size=64), {}, 112)


def test_bad_teacher_is_one_clear_error(tmp_path, teacher_file):
    with pytest.raises(BadInputError, match="no teacher"):
        run_stage(tmp_path, tiny_config(teacher_file, teacher=None), "x")
    with pytest.raises(BadInputError, match="does not exist"):
        run_stage(tmp_path, tiny_config(teacher_file, teacher=str(tmp_path / "missing.pt")), "y")


def test_cache_request_records_stage_need(tmp_path, teacher_file):
    from shrinkcli.data import open_dataset

    teacher, _ = load_model(teacher_file)
    dataset = open_dataset("synthetic:2:2:0", input_size=SIZE)
    config = tiny_config(teacher_file, data="synthetic:2:2:0", cache_teacher=True, flip=False)
    task = stage.build_task(config, teacher, "b" * 64, dataset, tmp_path)
    assert isinstance(task.cache_request, CacheRequest)
    assert task.cache_request.with_stages and task.cache_request.flips == 1
    no_stages = stage.build_task(tiny_config(teacher_file, data="synthetic:2:2:0", cache_teacher=True,
                                             stage_loss="none"), teacher, "b" * 64, dataset, tmp_path)
    assert not no_stages.cache_request.with_stages and no_stages.head is not None


def test_insightface_style_backbone_pth_teacher(tmp_path, teacher_file):
    teacher, _ = load_model(teacher_file)
    plain = tmp_path / "backbone.pth"
    torch.save(teacher.state_dict(), plain)        # no metadata: the architecture is inferred
    artifact, loaded, meta = stage.load_teacher(str(plain))
    assert meta["arch"] == "r18" and loaded.input_size == SIZE and artifact.sha256 == meta["sha256"]


def test_cli_distill_json(tmp_path, teacher_file):
    from typer.testing import CliRunner

    from shrinkcli.cli import app

    result = CliRunner().invoke(app, ["--json", "distill", "--teacher", str(teacher_file), "--data", "synthetic:4:4",
                                      "--width", "0.25", "--embedding-size", "32", "--epochs", "1", "--batch-size", "8",
                                      "--cache-teacher", "--no-labels", "--project", str(tmp_path / "runs"),
                                      "--set", "workers=0"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["summary"]
    assert summary["cached_teacher"] is True and summary["teacher_forward_steps"] == 0 and summary["steps"] == 2


def test_no_labels_accepts_a_plain_folder_of_images(tmp_path, teacher_file):
    from PIL import Image

    from shrinkcli.data import open_dataset

    source = open_dataset("synthetic:2:4:0", input_size=SIZE)
    flat = tmp_path / "faces"
    (flat / "a" / "b").mkdir(parents=True)
    for i in range(len(source)):
        folder = flat if i % 2 else flat / "a" / "b"               # any layout, no identity folders
        Image.fromarray(source.load_uint8(i).transpose(1, 2, 0)).save(folder / f"img{i}.png")
    result = run_stage(tmp_path, tiny_config(teacher_file, data=str(flat), labels=False, epochs=1), "flat")
    assert result["summary"]["steps"] == 1
    with pytest.raises(BadInputError):
        run_stage(tmp_path, tiny_config(teacher_file, data=str(flat), labels=True, epochs=1), "flat_labelled")


def test_margin_only_baseline_never_runs_the_teacher(teacher_file):
    from shrinkcli.losses.margin import MarginHead

    teacher, _ = load_model(teacher_file)
    student = create_model("mobilefacenet", embedding_size=32, input_size=SIZE, width=0.25)
    criterion = DistillCriterion(student_channels=student.stage_channels, teacher_channels=teacher.stage_channels,
                                 student_embedding=32, teacher_embedding=32, embed_loss="none", stage_loss="none")
    task = DistillTask(student=student, teacher=teacher, criterion=criterion,
                       head=MarginHead(32, 2, kind="cosface", scale=16.0))
    loss, logs = task.loss(torch.randn(2, 3, SIZE, SIZE), torch.tensor([0, 1]), torch.arange(2), None)
    assert task.teacher_steps == 0 and torch.isfinite(loss) and logs["distill"].item() == 0.0
