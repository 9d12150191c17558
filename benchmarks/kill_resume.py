"""kill -9 a `shrink teacher` run at random moments, resume it, repeat; then let it finish.

After every kill: weights/last.pt must load with torch.load(weights_only=True) as the engine loads
it, manifest.json must parse, no half-written file may sit under its real name, and the work lost
(last logged step minus the checkpoint's step) must be at most one checkpoint interval. The final
`--resume` must exit 0 with the manifest marked completed at the planned step count.

    python benchmarks/kill_resume.py --seeds 3 --kills 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "r18", "--input-size", "32", "--width", "0.125", "--embedding-size", "16", "--batch-size", "4",
        "--device", "cpu", "--data", "synthetic:4:4", "--set", "workers=0", "--set", "log_every=1"]


def _command(run_dir: Path, epochs: int, every: int, resume: bool) -> list[str]:
    base = [sys.executable, "-m", "shrinkcli", "teacher"]
    if resume:
        return base + ["--resume", str(run_dir), "--set", "log_every=1"]  # log_every is per invocation
    return base + TINY + ["--epochs", str(epochs), "--set", f"save_every_steps={every}", "--run-dir", str(run_dir)]


def _last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().startswith("{")]
    return max(steps, default=0)


def _check_after_kill(run_dir: Path) -> dict:
    import torch

    state = torch.load(run_dir / "weights" / "last.pt", map_location="cpu", weights_only=True)
    assert state["format"] == "shrink-train", "last.pt is not a full training state"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    visible = [p for p in run_dir.rglob("*") if p.is_file() and p.suffix == ".tmp" and not p.name.startswith(".")]
    assert not visible, f"half-written files under real names: {visible}"
    return {"checkpoint_step": int(state["step"]), "status": manifest["status"]}


def _run_until_killed(command: list[str], run_dir: Path, delay: float, env: dict) -> tuple[bool, float]:
    """Start, wait until this process has written a checkpoint, then `delay` seconds more, kill -9.
    Returns (killed?, seconds); not killed means the run ended first."""
    started = time.monotonic()
    last = run_dir / "weights" / "last.pt"
    before = last.stat().st_mtime_ns if last.is_file() else None
    process = subprocess.Popen(command, cwd=run_dir.parent, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    while process.poll() is None and (not last.is_file() or last.stat().st_mtime_ns == before):
        time.sleep(0.02)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    if process.poll() is not None:
        return False, time.monotonic() - started
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True, time.monotonic() - started


def trial(seed: int, kills: int, epochs: int, every: int, workdir: Path) -> list[dict]:
    rng = random.Random(seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run_dir = workdir / f"seed{seed}"
    rows = []
    for attempt in range(kills):
        command = _command(run_dir, epochs, every, resume=attempt > 0)
        killed, seconds = _run_until_killed(command, run_dir, rng.uniform(0.0, 2.0), env)
        if not killed:
            break
        check = _check_after_kill(run_dir)
        logged = _last_logged_step(run_dir)
        lost = max(0, logged - check["checkpoint_step"])
        rows.append({"seed": seed, "kill": attempt + 1, "after_s": round(seconds, 1), "logged_step": logged,
                     "checkpoint_step": check["checkpoint_step"], "lost_steps": lost,
                     "ok": lost <= every, "manifest": check["status"]})
    started_once = (run_dir / "manifest.json").is_file()
    final = subprocess.run(_command(run_dir, epochs, every, resume=started_once), cwd=workdir, env=env,
                           capture_output=True, text=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    import torch

    step = int(torch.load(run_dir / "weights" / "last.pt", map_location="cpu", weights_only=True)["step"])
    done = final.returncode == 0 and manifest["status"] == "completed" and step == epochs * 4
    rows.append({"seed": seed, "kill": "final resume", "after_s": None, "logged_step": _last_logged_step(run_dir),
                 "checkpoint_step": step, "lost_steps": 0, "ok": done,
                 "manifest": f"{manifest['status']} (exit {final.returncode})"})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--kills", type=int, default=3, help="kill -9 attempts per seed before the final resume")
    parser.add_argument("--epochs", type=int, default=25, help="4 steps per epoch on synthetic:4:4")
    parser.add_argument("--every", type=int, default=3, help="save_every_steps (the checkpoint interval)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kill_resume_") as tmp:
        for seed in range(args.seeds):
            rows += trial(seed, args.kills, args.epochs, args.every, Path(tmp))
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    failed = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - args.seeds} kills over {args.seeds} seeds, checkpoint every {args.every} steps: "
          f"{'all checks passed' if not failed else f'{len(failed)} FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
