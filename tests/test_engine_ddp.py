"""Two CPU processes with gloo under torchrun: identical weights on both ranks, rank-0-only files,
and a resume of that run in a single process (different world size) from the global position."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from shrinkcli.engine import Trainer
from shrinkcli.engine.checkpoint import load_checkpoint
from shrinkcli.rundir import RunDir
from test_engine_toys import ToyFaces, ToyTask, toy_config

SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from shrinkcli.engine import Trainer
    from shrinkcli.engine.distributed import env_dist_info
    from shrinkcli.rundir import RunDir
    from test_engine_toys import ToyFaces, ToyTask, toy_config

    info = env_dist_info()
    torch.manual_seed(100 + info.rank)  # different initial weights: rank 0's must win
    task = ToyTask(sample_rate=0.5)
    run = RunDir.create("teacher", run_dir={run_dir!r}) if info.rank == 0 else None
    result = Trainer(toy_config(epochs=2, batch_size=8, max_steps=3), run, task, ToyFaces()).fit()  # 2 ranks x 4
    state = {{f"{{n}}.{{k}}": v for n, m in task.modules().items() for k, v in m.state_dict().items()}}
    torch.save(state, {out!r} + f"/rank{{info.rank}}.pt")
    print("world", result["world_size"], "steps", result["steps"], flush=True)
""")


def test_two_gloo_processes_end_identical_and_resume_on_one(tmp_path):
    run_dir = tmp_path / "ddp"
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), run_dir=str(run_dir), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("world 2 steps 3") == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    state = load_checkpoint(run_dir / "weights" / "last.pt")
    assert (state["world_size"], state["position"], state["step"]) == (2, 24, 3)  # 3 steps x 2 ranks x 4
    assert not list(tmp_path.glob("runs"))  # rank 1 created no run dir of its own

    run = RunDir(run_dir, "teacher")
    task = ToyTask(sample_rate=0.5)
    result = Trainer(toy_config(epochs=2, batch_size=4), run, task, ToyFaces()).fit(resume=run_dir)
    # one process: 12 steps per epoch; 24 samples already seen -> resumes at step 6 of epoch 0
    assert result["world_size"] == 1 and result["steps"] == 24 and result["epochs"] == 2


CURVE_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from shrinkcli.engine import Trainer
    from shrinkcli.engine.distributed import env_dist_info
    from shrinkcli.rundir import RunDir
    from test_engine_toys import ToyFaces, ToyTask, toy_config

    info = env_dist_info()
    torch.manual_seed(0)
    task = ToyTask(norm=False)
    run = RunDir.create("teacher", run_dir={run_dir!r}) if info.rank == 0 else None
    Trainer(toy_config(epochs=2, batch_size=8), run, task, ToyFaces()).fit()
""")


def _losses(run_dir: Path) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line and '"step"' in line]


def test_two_ranks_follow_the_single_process_loss_curve_at_the_same_global_batch(tmp_path):
    """batch_size is the global batch: 2 ranks x 4 images take the same steps as 1 process x 8,
    and with DDP averaging the gradients the losses agree to float tolerance."""
    script = tmp_path / "curve.py"
    script.write_text(CURVE_SCRIPT.format(tests=str(Path(__file__).parent), run_dir=str(tmp_path / "two")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    torch.manual_seed(0)
    one = tmp_path / "one"
    Trainer(toy_config(epochs=2, batch_size=8), RunDir.create("teacher", run_dir=one), ToyTask(norm=False),
            ToyFaces()).fit()
    two_losses, one_losses = _losses(tmp_path / "two"), _losses(one)
    assert len(two_losses) == len(one_losses) == 12  # 48 images / global batch 8 x 2 epochs
    assert torch.allclose(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-5, atol=1e-6), \
        (two_losses, one_losses)
    two = load_checkpoint(tmp_path / "two" / "weights" / "last.pt")["model"]
    single = load_checkpoint(one / "weights" / "last.pt")["model"]
    for key in single:
        assert torch.allclose(two[key], single[key], atol=1e-5), key


def test_a_global_batch_that_does_not_split_over_the_ranks_is_bad_input(monkeypatch):
    import pytest

    from shrinkcli.engine import distributed as ddp
    from shrinkcli.errors import BadInputError

    info = ddp.DistInfo(rank=0, world_size=3)
    monkeypatch.setattr(ddp, "env_dist_info", lambda: info)
    monkeypatch.setattr(ddp, "init_distributed", lambda device="auto": info)
    with pytest.raises(BadInputError, match="not divisible by the 3 processes"):
        Trainer(toy_config(batch_size=8), None, ToyTask(), ToyFaces())
