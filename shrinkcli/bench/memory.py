"""Suite `memory`: peak resident memory of each stage of a reduced quickstart pipeline.

Each stage runs as its own `python -m shrinkcli ...` process (teacher -> distill -> export ->
verify, synthetic data, 64 px) and its peak RSS is read from the kernel's rusage of that child
(`os.wait4`, `ru_maxrss`, read by a small launcher process so the benchmark's own memory does
not leak into the figure), so one stage's allocations never hide in another's. A bare
`import torch` process is measured the same way as the floor every stage starts from.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from shrinkcli.bench.timing import info_row

SUITE = "memory"


# A fresh, small process forks and execs the stage and reports its rusage. Forking the stage straight
# from this (large) benchmark process would not do: the child's ru_maxrss keeps the high-water mark of
# the address space it was forked with, i.e. this process's memory.
_LAUNCHER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(json.dumps({"maxrss_kib": usage.ru_maxrss, "seconds": time.perf_counter() - started,
                  "code": os.waitstatus_to_exitcode(status)}))
"""


def peak_rss(command: list[str]) -> tuple[float, float, int]:
    """(peak RSS MiB, wall seconds, exit code) of one child process (Linux: ru_maxrss in KiB)."""
    import json

    launched = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], capture_output=True, text=True, check=False)
    if launched.returncode != 0 or not launched.stdout.strip():
        return float("nan"), float("nan"), launched.returncode or 1
    report = json.loads(launched.stdout.strip().splitlines()[-1])
    return report["maxrss_kib"] / 1024.0, report["seconds"], int(report["code"])


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
