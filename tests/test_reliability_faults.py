"""Faults from outside: kill -9 mid-training then --resume, a full disk, a diverging loss,
malicious pickles at every entry point that reads weights or packs, and concurrent processes
claiming run dirs under one parent. Each goes through the CLI (or a real subprocess)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from shrinkcli.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "r18", "--input-size", "32", "--width", "0.125", "--embedding-size", "16",
        "--batch-size", "4", "--device", "cpu", "--set", "workers=0"]
PWNED = "PWNED_MARKER"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_checkpoint_like_the_engine(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["format"] == "shrink-train"
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    return state


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def _error_line(result) -> str:
    lines = result.stderr.rstrip("\n").splitlines()
    assert "Traceback" not in result.output, result.output
    assert lines and lines[-1].startswith("shrink: error: "), result.stderr
    return lines[-1]


KILL_IN_QUANTIZER = """
import os, signal, sys
import onnxruntime.quantization as quantization
import shrinkcli.export.quantize as quantize

def killed(*args, **kwargs):      # kill -9 while the quantizer works in its temp folder
    os.kill(os.getpid(), signal.SIGKILL)

quantization.quantize_static = quantize.quantize_static = killed
from shrinkcli.cli import main
sys.argv = ["shrink", *sys.argv[1:]]
main()
"""


def test_kill_9_during_int8_export_leaves_no_int8_file_and_the_next_run_cleans_up(tmp_path):
    from _helpers import tiny_student_files

    weights = tiny_student_files(tmp_path)["weights"]
    out = tmp_path / "export"
    args = ["export", "--weights", str(weights), "--quantize", "int8", "--calib-data", "synthetic:4:4:0",
            "--run-dir", str(out)]
    script = tmp_path / "kill_in_quantizer.py"
    script.write_text(KILL_IN_QUANTIZER)
    process = subprocess.run([sys.executable, str(script), *args], env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    assert [p.name for p in out.glob(".shrink-tmp-int8-*")]          # kill -9: nothing could remove it
    assert not (out / "model-int8.onnx").exists()                     # never a half-made or unchecked file
    manifest = _manifest(out)
    assert manifest["status"] == "running" and "onnx-int8" not in {o["kind"] for o in manifest["outputs"]}

    again = runner.invoke(app, ["--json", *args, "--exist-ok"])
    assert again.exit_code == 0, again.output
    assert not list(out.glob(".shrink-tmp-*"))                        # the next run removed the leftovers
    manifest = _manifest(out)
    assert manifest["status"] == "completed"
    assert manifest["results"]["parity"]["int8"]["passed"] is not None
    assert "onnx-int8" in {o["kind"] for o in manifest["outputs"]}


# ------------------------------------------------------------------------------ kill -9, resume

def test_kill_9_after_first_checkpoint_then_resume_completes(tmp_path):
    run_dir = tmp_path / "runs" / "teacher" / "killed"
    argv = [sys.executable, "-m", "shrinkcli", "teacher", *TINY, "--data", "synthetic:4:4", "--epochs", "100",
            "--set", "save_every_steps=1", "--run-dir", str(run_dir)]
    process = subprocess.Popen(argv, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run_dir / "weights" / "last.pt"
    deadline = time.monotonic() + 120
    try:
        while not last.is_file():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        time.sleep(0.3)                       # land somewhere inside the following steps
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    killed_at = _load_checkpoint_like_the_engine(last)["step"]
    assert _manifest(run_dir)["status"] == "running"   # killed: nobody could mark it
    assert not list(run_dir.rglob("*.tmp")) or all(p.name.startswith(".") for p in run_dir.rglob("*.tmp"))

    result = runner.invoke(app, ["--json", "teacher", "--resume", str(run_dir), "--set", f"max_steps={killed_at + 2}"])
    assert result.exit_code == 0, result.output
    manifest = _manifest(run_dir)
    assert manifest["status"] == "completed"
    assert manifest["results"]["resumes"][0]["step"] == killed_at
    assert _load_checkpoint_like_the_engine(last)["step"] == killed_at + 2
    assert (run_dir / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------- full disk

def _fsync_fails_for(target_name: str):
    real_fsync = os.fsync

    def fsync(fd):
        if target_name in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    return fsync


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the file being synced")
def test_disk_full_while_checkpointing_is_exit_2_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "t"
    first = runner.invoke(app, ["teacher", *TINY, "--data", "synthetic:4:4", "--epochs", "3",
                                "--set", "max_steps=1", "--run-dir", str(run_dir)])
    assert first.exit_code == 0, first.output
    last = run_dir / "weights" / "last.pt"
    before = _sha(last)
    monkeypatch.setattr(os, "fsync", _fsync_fails_for("last.pt"))
    result = runner.invoke(app, ["teacher", "--resume", str(run_dir), "--set", "max_steps=2"])
    assert result.exit_code == 2, result.output
    line = _error_line(result)
    assert "cannot write" in line and "last.pt" in line and "No space left" in line
    assert _sha(last) == before and _load_checkpoint_like_the_engine(last)["step"] == 1
    assert not [p for p in last.parent.iterdir() if p.suffix == ".tmp"], "temp file left behind"
    assert _manifest(run_dir)["status"] == "failed"


def test_file_size_limit_in_a_subprocess_keeps_the_previous_weights(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write itself (EFBIG), as a full disk would."""
    from shrinkcli.models import create_model

    torch.manual_seed(0)
    source = tmp_path / "r18.pt"
    torch.save(create_model("r18", input_size=32, width=0.125, embedding_size=16).state_dict(), source)
    run_dir = tmp_path / "imported"
    first = runner.invoke(app, ["teacher", "--load", str(source), "--run-dir", str(run_dir)])
    assert first.exit_code == 0, first.output
    weights = run_dir / "model.safetensors"
    before = _sha(weights)
    limit = 64 * 1024                        # the manifest fits, the ~0.7 MB weights do not
    assert weights.stat().st_size > 4 * limit
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (%d, %d)); "
            "from shrinkcli.cli import main; sys.argv = ['shrink'] + sys.argv[1:]; main()") % (limit, limit)
    out = subprocess.run([sys.executable, "-c", code, "teacher", "--load", str(source), "--run-dir", str(run_dir),
                          "--exist-ok"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert out.stderr.rstrip().splitlines()[-1].startswith("shrink: error: cannot write"), out.stderr
    assert "model.safetensors" in out.stderr
    assert _sha(weights) == before
    assert not [p for p in run_dir.iterdir() if p.suffix == ".tmp"]


# ----------------------------------------------------------------------------------- NaN loss

@pytest.mark.parametrize("policy, needle", [
    ("stop", "non-finite loss"),
    ("skip", "max_nan_skips=1"),   # skipped steps must not leave NaN BatchNorm stats either
])
def test_diverging_loss_is_exit_1_and_leaves_a_finite_checkpoint(tmp_path, policy, needle):
    run_dir = tmp_path / "nan"
    # lr 1e30 without clipping: the first step makes the weights huge, the next losses are NaN
    result = runner.invoke(app, ["teacher", *TINY, "--data", "synthetic:4:4", "--epochs", "2", "--lr", "1e30",
                                 "--set", "clip_grad=none", "--set", "save_every_steps=1",
                                 "--set", f"nan_policy={policy}", "--set", "max_nan_skips=1",
                                 "--run-dir", str(run_dir)])
    assert result.exit_code == 1, result.output
    line = _error_line(result)
    assert needle in line and "step" in line
    assert _manifest(run_dir)["status"] == "diverged"
    _load_checkpoint_like_the_engine(run_dir / "weights" / "last.pt")   # never replaced by NaN weights


# -------------------------------------------------------------------------- malicious pickles

class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_evil(path: Path, wrap) -> Path:
    path.write_bytes(pickle.dumps(wrap(_Exploit(path.parent / PWNED)), protocol=2))
    return path


ENTRY_POINTS = {
    "teacher --load": (lambda t: ["teacher", "--load", str(_write_evil(t / "a.pt", lambda p: {"model": p}))]),
    "teacher --resume": (lambda t: ["teacher", "--resume", str(_write_evil(t / "last.pt", lambda p: {"format": p}))]),
    "distill --teacher": (lambda t: ["distill", "--teacher", str(_write_evil(t / "backbone.pth", lambda p: p)),
                                     "--data", "synthetic:2:2"]),
    "export --weights": (lambda t: ["export", "--weights", str(_write_evil(t / "w.pt", lambda p: {"state_dict": p}))]),
    "verify --model": (lambda t: ["verify", "--model", str(_write_evil(t / "m.pth", lambda p: p)),
                                  "--pairs", "pairs:8@synthetic:4:2"]),
    "verify --pairs .bin": (lambda t: ["verify", "--model", "m.safetensors",
                                       "--pairs", str(_write_evil(t / "lfw.bin", lambda p: ([p, b"x"], [True])))]),
    "teacher --val .bin": (lambda t: ["teacher", *TINY, "--data", "synthetic:2:2", "--epochs", "1",
                                      "--val", str(_write_evil(t / "cfp.bin", lambda p: (p, [True])))]),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_malicious_pickle_is_refused_and_never_executed(tmp_path, monkeypatch, entry):
    monkeypatch.chdir(tmp_path)
    if entry == "verify --pairs .bin":
        from shrinkcli.models import create_model
        from shrinkcli.models.io import save_model_safetensors

        save_model_safetensors(create_model("mobilefacenet", input_size=32, width=0.25, embedding_size=16),
                               tmp_path / "m.safetensors", {"mean": 127.5, "std": 127.5, "crop": None,
                                                            "input_size": 32, "channel_order": "RGB"})
    result = runner.invoke(app, [*ENTRY_POINTS[entry](tmp_path), "--project", str(tmp_path / "runs")])
    assert not (tmp_path / PWNED).exists(), "the pickle ran code"
    assert result.exit_code == 2, result.output
    line = _error_line(result)
    assert any(word in line for word in ("refus", "unsafe", "not a readable")), line


# -------------------------------------------------------------------- concurrent run creation

CLAIM = """
import sys, time
from pathlib import Path
from shrinkcli.rundir import RunDir
root, go, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
while not go.exists():
    time.sleep(0.001)
for _ in range(count):
    print(RunDir.create("distill", root=root, config={"pid": __import__("os").getpid()}).path)
"""


def test_concurrent_processes_get_distinct_run_dirs(tmp_path):
    go, processes, per_process = tmp_path / "go", 6, 4
    children = [subprocess.Popen([sys.executable, "-c", CLAIM, str(tmp_path / "runs"), str(go), str(per_process)],
                                 env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(processes)]
    time.sleep(1.0)                          # let every interpreter start and wait at the barrier
    go.touch()
    paths = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        paths += out.split()
    assert len(paths) == len(set(paths)) == processes * per_process
    owners = [_manifest(Path(p))["config"]["pid"] for p in paths]
    assert sorted(owners) == sorted(c.pid for c in children for _ in range(per_process))
