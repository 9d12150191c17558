"""Devices and mixed precision: a device this machine lacks is bad input; fp16 with nan_policy=skip
keeps the gradient scaler consistent across a skipped step."""

from __future__ import annotations

import pytest
import torch

from shrinkcli.engine import Trainer
from shrinkcli.engine import distributed as ddp
from shrinkcli.errors import BadInputError
from test_engine_toys import ToyFaces, ToyTask, toy_config

NO_GPU = not torch.cuda.is_available()


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "tpu", "gpu0"])
def test_a_device_this_machine_lacks_is_bad_input(device):
    if device.startswith("cuda") and not NO_GPU:
        pytest.skip("this machine has a GPU")
    with pytest.raises(BadInputError):
        ddp.resolve_device(device, ddp.DistInfo())


def test_cuda_n_under_torchrun_is_refused_instead_of_stacking_every_rank_on_one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    two_ranks = ddp.DistInfo(rank=1, world_size=2, local_rank=1)
    with pytest.raises(BadInputError, match="every process on one GPU"):
        ddp.resolve_device("cuda:0", two_ranks)
    assert ddp.resolve_device("cuda", two_ranks) == torch.device("cuda", 1)
    assert ddp.resolve_device("cuda:2", ddp.DistInfo()) == torch.device("cuda", 2)


def test_fp16_skip_policy_survives_a_non_finite_step():
    task = ToyTask(nan_at_steps=(2,))
    config = toy_config(amp="fp16", nan_policy="skip", max_nan_skips=3, epochs=1)
    result = Trainer(config, None, task, ToyFaces()).fit()
    assert result["steps"] == 6 and result["nan_skips"] == 1
    assert result["final_loss"] == result["final_loss"]  # finite steps after the skipped one
