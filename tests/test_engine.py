import json
import math
import os
import signal

import pytest
import torch

from shrinkcli.engine import Trainer, TrainTask
from shrinkcli.engine.checkpoint import load_checkpoint
from shrinkcli.engine.optim import LRSchedule, param_groups
from shrinkcli.errors import BadInputError, TrainingDivergedError
from shrinkcli.rundir import RunDir, load_manifest
from test_engine_toys import ToyBackbone, ToyFaces, ToyTask, toy_config


def make_run(tmp_path, name="run"):
    return RunDir.create("teacher", run_dir=tmp_path / name)


def test_param_groups_exclude_bn_bias_prelu_from_decay():
    model = ToyBackbone()
    groups = {g["group"]: g for g in param_groups([model], 5e-4)}
    decayed = {id(p) for p in groups["decay"]["params"]}
    assert decayed == {id(model.conv.weight), id(model.fc.weight)}
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert id(model.act.weight) not in decayed and id(model.bn.weight) not in decayed


@pytest.mark.parametrize("kind", ["cosine", "poly", "step", "constant"])
def test_schedule_warmup_then_decay_and_state_round_trip(kind):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = LRSchedule(opt, kind=kind, total_steps=100, warmup_steps=10, base_lr=0.1, min_lr=0.001,
                       milestones_steps=[50], gamma=0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # first warm-up step: 1/10 of lr
    lrs = []
    for _ in range(99):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[8] == pytest.approx(0.1)  # step 9 -> end of warm-up
    expected_end = {"cosine": 0.001, "poly": 0.001, "step": 0.01, "constant": 0.1}[kind]
    assert lrs[-1] == pytest.approx(expected_end, rel=0.05, abs=2e-4)
    other = LRSchedule(opt, kind=kind, total_steps=100, warmup_steps=10, base_lr=0.1, min_lr=0.001,
                       milestones_steps=[50])
    other.load_state_dict(sched.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[-1])


def test_fit_writes_checkpoints_metrics_and_learns(tmp_path):
    run = make_run(tmp_path)
    task = ToyTask()
    assert isinstance(task, TrainTask)
    trainer = Trainer(toy_config(epochs=4), run, task, ToyFaces())
    first = None
    result = trainer.fit()
    steps = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    first = steps[0]["loss"]
    assert result["steps"] == 4 * (48 // 8) == len(steps)
    assert result["final_loss"] < first
    assert {"lr", "img_per_s", "margin", "nan_skips"} <= set(steps[0])
    assert (run.path / "metrics.csv").read_text().count("\n") == 5  # header + 4 epochs
    assert (run.path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    state = load_checkpoint(run.path / "weights" / "last.pt")
    assert state["epoch"] == 4 and state["position"] == 0 and state["step"] == 24
    assert set(state["modules"]) == {"head"} and state["arch"] == "toy"
    kinds = {o["kind"] for o in load_manifest(run.path)["outputs"]}
    assert {"checkpoint", "metrics"} <= kinds


def test_engine_flips_batches_itself_about_half_the_time(tmp_path):
    task = ToyTask()
    Trainer(toy_config(epochs=2), None, task, ToyFaces()).fit()
    flags = torch.cat(task.seen_flips)
    assert 0.3 < flags.float().mean() < 0.7
    task2 = ToyTask()
    Trainer(toy_config(epochs=1, flip=False), None, task2, ToyFaces()).fit()
    assert not torch.cat(task2.seen_flips).any()


def _weights(task):
    return {f"{n}.{k}": v.clone() for n, m in task.modules().items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_interrupted_and_resumed_run_matches_uninterrupted_bitwise(tmp_path, sample_rate):
    torch.manual_seed(0)
    full_task = ToyTask(sample_rate=sample_rate)
    init = _weights(full_task)
    Trainer(toy_config(epochs=3), make_run(tmp_path, "full"), full_task, ToyFaces()).fit()

    def fresh():
        task = ToyTask(sample_rate=sample_rate)
        for name, module in task.modules().items():
            module.load_state_dict({k[len(name) + 1:]: v for k, v in init.items() if k.startswith(name + ".")})
        return task

    run = make_run(tmp_path, "split")
    Trainer(toy_config(epochs=3, max_steps=8), run, fresh(), ToyFaces()).fit()  # stops mid-epoch 1
    state = load_checkpoint(run.path / "weights" / "last.pt")
    assert (state["epoch"], state["position"], state["step"]) == (1, 16, 8)
    torch.manual_seed(1234)  # the resume must not depend on the caller's RNG
    resumed_task = fresh()
    result = Trainer(toy_config(epochs=3), run, resumed_task, ToyFaces()).fit(resume=run.path)
    assert result["steps"] == 18
    expected, got = _weights(full_task), _weights(resumed_task)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 19))


class CtrlCTask(ToyTask):
    """Sends this process SIGINT (what Ctrl-C does) during the loss of the given calls."""

    def __init__(self, at_calls, presses: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.at_calls, self.presses = set(at_calls), presses

    def loss(self, images, labels, indices, flipped):
        out = super().loss(images, labels, indices, flipped)
        if self.calls in self.at_calls:
            for _ in range(self.presses):
                os.kill(os.getpid(), signal.SIGINT)
        return out


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    full_task = ToyTask()
    init = _weights(full_task)
    Trainer(toy_config(epochs=2), make_run(tmp_path, "full"), full_task, ToyFaces()).fit()

    def load_init(task):
        for name, module in task.modules().items():
            module.load_state_dict({k[len(name) + 1:]: v for k, v in init.items() if k.startswith(name + ".")})
        return task

    run = make_run(tmp_path, "interrupted")
    before = signal.getsignal(signal.SIGINT)    # default_int_handler, or SIG_IGN under a background job
    with pytest.raises(KeyboardInterrupt):
        Trainer(toy_config(epochs=2, save_every_steps=0), run, load_init(CtrlCTask({5})), ToyFaces()).fit()
    assert signal.getsignal(signal.SIGINT) is before                           # handler restored
    assert load_manifest(run.path)["status"] == "interrupted"
    state = load_checkpoint(run.path / "weights" / "last.pt")
    assert state["step"] == 5                                                   # the step in flight finished
    resumed = load_init(ToyTask())
    Trainer(toy_config(epochs=2), run, resumed, ToyFaces()).fit(resume=run.path)
    expected, got = _weights(full_task), _weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)

    twice = make_run(tmp_path, "twice")
    task = load_init(CtrlCTask({3}, presses=2))
    with pytest.raises(KeyboardInterrupt):      # a second Ctrl-C inside the same step stops at once
        Trainer(toy_config(epochs=2, save_every_steps=0), twice, task, ToyFaces()).fit()
    assert task.calls == 3 and load_manifest(twice.path)["status"] == "interrupted"
    last = twice.path / "weights" / "last.pt"
    assert not last.exists() or load_checkpoint(last)["step"] < 3     # no checkpoint of the unfinished step


def test_nan_stop_names_step_and_last_checkpoint(tmp_path):
    run = make_run(tmp_path)
    task = ToyTask(nan_at_steps={8})
    with pytest.raises(TrainingDivergedError) as info:
        Trainer(toy_config(epochs=3), run, task, ToyFaces()).fit()
    message = str(info.value)
    assert "step 8" in message and str(run.path / "weights" / "last.pt") in message
    assert load_manifest(run.path)["status"] == "diverged"
    state = load_checkpoint(run.path / "weights" / "last.pt")
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_skip_counts_and_gives_up_after_max(tmp_path):
    run = make_run(tmp_path)
    result = Trainer(toy_config(epochs=1, nan_policy="skip"), run, ToyTask(nan_at_steps={2, 4}), ToyFaces()).fit()
    assert result["nan_skips"] == 2 and math.isfinite(result["final_loss"])
    assert load_manifest(run.path)["results"]["nan_skips"] == 2
    with pytest.raises(TrainingDivergedError, match="max_nan_skips=1"):
        Trainer(toy_config(epochs=1, nan_policy="skip", max_nan_skips=1), None,
                ToyTask(nan_at_steps={1, 2}), ToyFaces()).fit()


def test_non_finite_weights_never_replace_a_good_checkpoint(tmp_path):
    run = make_run(tmp_path)
    task = ToyTask()
    trainer = Trainer(toy_config(epochs=1), run, task, ToyFaces())
    trainer.fit()
    good = (run.path / "weights" / "last.pt").read_bytes()
    with torch.no_grad():
        task.backbone.fc.weight.fill_(float("inf"))
    with pytest.raises(TrainingDivergedError, match="non-finite"):
        trainer.save()
    assert (run.path / "weights" / "last.pt").read_bytes() == good


def test_validation_logs_accuracy_and_best_checkpoint(tmp_path):
    from types import SimpleNamespace

    import numpy as np

    data = ToyFaces(count=48)
    images = ((data.images.clamp(-1, 1) * 127.5) + 127.5).round().to(torch.uint8)
    left = np.arange(0, 40)
    right = left + np.where(left % 2 == 0, 4, 1)  # even: same identity, odd: different
    pairs = SimpleNamespace(images=images, left=left, right=right, issame=(data.labels[left] == data.labels[right]),
                            folds=None, names=None)
    run = make_run(tmp_path)
    result = Trainer(toy_config(epochs=2), run, ToyTask(), data, val_pairs=pairs).fit()
    assert 0.0 <= result["val_accuracy"] <= 1.0 and result["best_accuracy"] is not None
    assert (run.path / "weights" / "best.pt").is_file()
    assert "val_accuracy" in (run.path / "metrics.csv").read_text()


def test_too_little_data_is_a_clear_error():
    with pytest.raises(BadInputError, match="fewer than one global batch"):
        Trainer(toy_config(batch_size=64), None, ToyTask(), ToyFaces(count=10))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cpu_autocast_modes_train_with_finite_loss(amp):
    trainer = Trainer(toy_config(epochs=1, amp=amp), None, ToyTask(), ToyFaces())
    assert (trainer.scaler is not None) == (amp == "fp16")
    result = trainer.fit()
    assert math.isfinite(result["final_loss"]) and result["steps"] == 6


def test_auto_amp_is_fp32_on_cpu_and_bf16_on_cuda():
    from shrinkcli.engine.trainer import amp_dtype

    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert amp_dtype("off", torch.device("cuda")) is None


def test_worker_processes_give_the_same_weights_as_in_process_loading(tmp_path):
    torch.manual_seed(0)
    a, b = ToyTask(), ToyTask()
    b.backbone.load_state_dict(a.backbone.state_dict())
    b.head.load_state_dict(a.head.state_dict())
    Trainer(toy_config(epochs=1), None, a, ToyFaces()).fit()
    Trainer(toy_config(epochs=1, workers=2), None, b, ToyFaces()).fit()
    for key, value in _weights(a).items():
        assert torch.equal(value, _weights(b)[key]), key


def test_progress_bar_at_a_terminal_does_not_disturb_training(monkeypatch):
    from shrinkcli import log

    monkeypatch.setattr(log, "show_progress", lambda: True)
    result = Trainer(toy_config(epochs=1), None, ToyTask(), ToyFaces()).fit()
    assert result["steps"] == 6


def test_resume_config_keeps_saved_values_unless_explicitly_changed():
    from shrinkcli.config import TeacherConfig
    from shrinkcli.engine.resume import merge_config

    saved = TeacherConfig(arch="r18", epochs=5, lr=0.05, max_steps=7, workers=4).to_dict()
    merged = merge_config(saved, TeacherConfig(epochs=9, workers=0))
    assert (merged.arch, merged.lr, merged.epochs) == ("r18", 0.05, 9)
    assert merged.max_steps == 0 and merged.workers == 0  # per-invocation keys come from the command


def test_resume_from_a_loose_checkpoint_opens_a_new_run_and_refuses_other_stages(tmp_path):
    import shutil

    from shrinkcli.engine.resume import resume_run
    from shrinkcli.rundir import RunOptions

    run = make_run(tmp_path, "src")
    Trainer(toy_config(epochs=1), run, ToyTask(), ToyFaces()).fit()
    loose = tmp_path / "loose.pt"
    shutil.copy(run.path / "weights" / "last.pt", loose)
    new_run, path, config = resume_run(loose, "teacher", toy_config(), RunOptions(run_dir=str(tmp_path / "new")))
    assert new_run.path == tmp_path / "new" and path == loose and config.seed == 3
    with pytest.raises(BadInputError, match="is a teacher run"):
        resume_run(run.path, "distill", toy_config(), RunOptions())
    with pytest.raises(BadInputError, match="nothing to resume"):
        resume_run(tmp_path / "missing", "teacher", toy_config(), RunOptions())


def test_frozen_modules_are_moved_eval_and_never_trained_or_saved(tmp_path):
    class FrozenTeacherTask(ToyTask):
        def __init__(self):
            super().__init__()
            self.teacher = ToyBackbone().train()
            self.started_with = None

        def frozen_modules(self):
            return {"teacher": self.teacher}

        def on_start(self, trainer):
            self.started_with = trainer.device

        def loss(self, images, labels, indices, flipped):
            loss, logs = super().loss(images, labels, indices, flipped)
            with torch.no_grad():
                target = self.teacher(images)
            return loss + 0.1 * (self.backbone(images) - target).pow(2).mean(), logs

    task = FrozenTeacherTask()
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    run = make_run(tmp_path)
    trainer = Trainer(toy_config(epochs=1), run, task, ToyFaces())
    trainer.fit()
    assert not task.teacher.training and task.started_with == torch.device("cpu")
    assert all(torch.equal(v, task.teacher.state_dict()[k]) for k, v in before.items())  # BN stats too
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in task.teacher.parameters()}
    assert "teacher" not in load_checkpoint(run.path / "weights" / "last.pt")["modules"]


def test_skipped_step_leaves_batchnorm_statistics_untouched(tmp_path):
    task = ToyTask(nan_at_steps={3})
    seen = {}
    original_loss = task.loss

    def loss_with_poisoned_batch(images, labels, indices, flipped):
        if task.calls + 1 == 3:  # the non-finite step: record BN stats before its forward pass
            seen["before"] = task.backbone.bn.running_mean.clone()
            images = images * float("nan")
        return original_loss(images, labels, indices, flipped)

    task.loss = loss_with_poisoned_batch
    run = make_run(tmp_path)
    result = Trainer(toy_config(epochs=1, nan_policy="skip", save_every_steps=1), run, task, ToyFaces()).fit()
    assert result["nan_skips"] == 1 and "before" in seen
    state = load_checkpoint(run.path / "weights" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
