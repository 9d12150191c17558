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
    result = Trainer(toy_config(epochs=2, batch_size=4, max_steps=3), run, task, ToyFaces()).fit()
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
