"""Suite `memory`: peak resident memory of each stage of a reduced quickstart pipeline.

Each stage runs as its own `python -m shrinkcli ...` process (teacher -> distill -> export ->
verify, synthetic data, 64 px) and its peak RSS is read from the kernel's rusage of that child
(`os.wait4`, `ru_maxrss`), so one stage's allocations never hide in another's. A bare
`import torch` process is measured the same way as the floor every stage starts from.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shrinkcli.bench.timing import info_row

SUITE = "memory"


def peak_rss(command: list[str]) -> tuple[float, float, int]:
    """(peak RSS MiB, wall seconds, exit code) of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.stderr is not None:
        child.stderr.close()
    return usage.ru_maxrss / 1024.0, time.perf_counter() - started, child.returncode


def stage_commands(root: Path, quick: bool) -> dict[str, list[str]]:
    shrink = [sys.executable, "-m", "shrinkcli"]
    data, val = ("synthetic:8:4:0", "pairs:40@synthetic:8:4:1") if quick else ("synthetic:32:8:0", "pairs:200@synthetic:20:6:1")
    size = "32" if quick else "64"
    common = ["--data", data, "--input-size", size, "--epochs", "1", "--batch-size", "32", "--embedding-size", "128",
              "--set", "workers=0"]
    return {
        "import torch (floor)": [sys.executable, "-c", "import torch"],
        "teacher": [*shrink, "teacher", "--arch", "r18", "--width", "0.5", *common, "--run-dir", str(root / "teacher")],
        "distill": [*shrink, "distill", "--teacher", str(root / "teacher"), *common, "--val", val, "--cache-teacher",
                    "--run-dir", str(root / "distill")],
        "export": [*shrink, "export", "--run", str(root / "distill"), "--format", "all", "--run-dir", str(root / "export")],
        "verify": [*shrink, "verify", "--model", str(root / "export"), "--reference", str(root / "distill"),
                   "--data", data.replace(":0", ":1"), "--pairs", val, "--run-dir", str(root / "verify")],
    }


def run(quick: bool = False, **_: Any) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="shrink-bench-memory-") as tmp:
        commands = stage_commands(Path(tmp), quick)
        if quick:   # a smoke run of the mechanism: the floor and one stage
            commands = {k: v for k, v in commands.items() if k in ("import torch (floor)", "teacher")}
        for stage, command in commands.items():
            mib, seconds, code = peak_rss(command)
            status = "ok" if code == 0 else f"exit {code}"
            rows.append(info_row(SUITE, f"peak RSS: {stage}", a=stage, a_value=mib, unit="MiB (b: wall s)",
                                 b="wall s", b_value=seconds,
                                 settings=f"{status}; {' '.join(command[2:] if command[1] == '-m' else command[1:])}"
                                 .replace(tmp, "$TMP")))
    return {"rows": rows}
