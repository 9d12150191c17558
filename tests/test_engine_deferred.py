"""The NaN policy with deferred checks (the CUDA path: loss and flags read every log_every steps),
exercised on CPU by forcing the deferral, against the immediate path that reads every step."""

import pytest
import torch

from shrinkcli.engine import Trainer
from shrinkcli.errors import TrainingDivergedError
from test_engine_toys import ToyFaces, ToyTask, toy_config


def fit(task, deferred, **config):
    trainer = Trainer(toy_config(**config), None, task, ToyFaces())
    trainer.defer_checks = deferred
    return trainer, trainer.fit()


def state(task):
    return {**{f"b.{k}": v.clone() for k, v in task.backbone.state_dict().items()},
            **{f"h.{k}": v.clone() for k, v in task.head.state_dict().items()}}


def poisoned(nan_step):
    """A task whose step `nan_step` sees NaN images: its loss, gradients and BN statistics go bad."""
    torch.manual_seed(0)
    task = ToyTask()
    original = task.loss

    def loss(images, labels, indices, flipped):
        if task.calls + 1 == nan_step:
            images = images * float("nan")
        return original(images, labels, indices, flipped)

    task.loss = loss
    return task


@pytest.mark.parametrize("log_every", [1, 5, 100])
def test_deferred_skip_leaves_exactly_the_immediate_state(log_every):
    _, immediate = fit(reference := poisoned(4), False, epochs=2, nan_policy="skip", log_every=log_every)
    trainer, deferred = fit(task := poisoned(4), True, epochs=2, nan_policy="skip", log_every=log_every)
    assert immediate["nan_skips"] == deferred["nan_skips"] == 1
    assert immediate["final_loss"] == deferred["final_loss"]
    assert trainer.checks.pending == []
    ours, theirs = state(task), state(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)   # parameters and BN statistics


def test_deferred_checks_read_only_at_log_steps(monkeypatch):
    reads = []
    task = ToyTask()
    trainer = Trainer(toy_config(epochs=1, log_every=3), None, task, ToyFaces())
    trainer.defer_checks = True
    original = trainer.checks.__class__.read

    def counting(self):
        entries = original(self)
        reads.append(len(entries))
        return entries

    monkeypatch.setattr(trainer.checks.__class__, "read", counting)
    trainer.fit()
    assert trainer.step == 6 and sum(reads) == 5   # step 1 is immediate (no optimizer state yet)
    assert max(reads) <= 3


def test_deferred_stop_names_the_step_and_keeps_the_last_good_state():
    with pytest.raises(TrainingDivergedError, match="step 8") as immediate_error:
        fit(reference := poisoned(8), False, epochs=3, log_every=100)
    with pytest.raises(TrainingDivergedError, match="step 8"):
        trainer, _ = fit(task := poisoned(8), True, epochs=3, log_every=100)
    assert "step 8" in str(immediate_error.value)
    ours, theirs = state(task), state(reference)
    params = [k for k in theirs if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(ours[k], theirs[k]) for k in params)
    # The steps run after the bad one (until the read at the epoch end) changed nothing either:
    # the BN statistics are still those before step 8.
    torch.manual_seed(0)
    _, _ = fit(clean := ToyTask(), False, epochs=3, log_every=100, max_steps=7)
    assert torch.equal(task.backbone.bn.running_mean, clean.backbone.bn.running_mean)
    assert all(torch.equal(ours[k], v) for k, v in state(clean).items() if "num_batches" not in k)


def test_deferred_skip_gives_up_at_the_step_past_max():
    with pytest.raises(TrainingDivergedError, match="max_nan_skips=1.*step 4"):
        fit(ToyTask(nan_at_steps={3, 4, 5}), True, epochs=1, nan_policy="skip", max_nan_skips=1, log_every=100)
