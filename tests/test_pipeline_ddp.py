"""The quickstart pipeline under torchrun on 2 CPU processes (gloo), teacher cache on, end to end,
against the same pipeline in one process: the student must learn as much (a 2-rank student once
stayed at chance while its loss fell)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Sized so the student takes enough steps (40) to leave the untrained regime on 2 cores in ~1 min.
SETTINGS = [
    "common.data=synthetic:32:10:0", "common.val=pairs:300@synthetic:30:6:1", "common.input_size=32",
    "common.batch_size=32", "common.log_every=5", "teacher.epochs=4", "distill.epochs=4",
    "distill.cache_teacher=true", "export.format=onnx", "verify.data=synthetic:30:6:1",
    "verify.pairs=pairs:300@synthetic:30:6:1", "verify.min_accuracy=0.0", "verify.latency_seconds=0",
]


def _pipeline(parent: Path, processes: int) -> subprocess.CompletedProcess:
    sets = [arg for item in SETTINGS for arg in ("--set", item)]
    command = ["-m", "shrinkcli", "--json", "pipeline", str(REPO / "recipes" / "quickstart.toml"),
               "--run-dir", str(parent), *sets]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=600)


def _curve(run_dir: Path) -> list[float]:
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    return [float(row.split(",")[header.index("val_accuracy")]) for row in rows[1:]]


def test_two_rank_pipeline_with_teacher_cache_learns_like_one_process(tmp_path):
    two = _pipeline(tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _pipeline(tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]

    distill = json.loads((tmp_path / "two" / "distill" / "manifest.json").read_text())
    assert distill["status"] == "completed" and distill["results"]["cached_teacher"] is True
    assert distill["results"]["world_size"] == 2 and distill["results"]["steps"] == 40
    # every rank read the teacher rank 0 wrote: the cache key is built from model.safetensors' sha256
    teacher_weights = json.loads((tmp_path / "two" / "teacher" / "manifest.json").read_text())
    [weights] = [o for o in teacher_weights["outputs"] if o["kind"] == "weights"]
    [teacher_input] = [i for i in distill["inputs"] if i["kind"] == "teacher"]
    assert teacher_input["sha256"] == weights["sha256"]

    two_curve, one_curve = _curve(tmp_path / "two" / "distill"), _curve(tmp_path / "one" / "distill")
    assert len(two_curve) == len(one_curve) == 4
    # Two independent short runs on 300 pairs: the pair sampling alone gives a difference sd of
    # ~0.037 at 0.7, and the per-rank BatchNorm batches (16 instead of 32) add run-to-run noise;
    # measured 2-rank minus 1-process gaps were +0.00 to -0.09. The collapse this guards against
    # sits at 0.41-0.45 (every image mapped to one direction), far below the floor.
    assert abs(two_curve[-1] - one_curve[-1]) <= 0.10, (two_curve, one_curve)
    assert min(two_curve[-1], one_curve[-1]) >= 0.6, (two_curve, one_curve)   # chance is 0.5
    verify = json.loads((tmp_path / "two" / "verify" / "report.json").read_text())
    assert verify["accuracy"]["model"]["accuracy"] >= 0.6, verify["accuracy"]
