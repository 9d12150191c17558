"""`shrink bench [SUITE] [--output FILE.md] [--quick]`: run benchmark suites, print and save the results."""

from __future__ import annotations

import importlib
import os
import platform
import sys
import time
from typing import Any

from shrinkcli import log
from shrinkcli.bench import SUITES
from shrinkcli.errors import BadInputError

TERMINAL_COLUMNS = ("suite", "measure", "a_value", "b_value", "unit", "ratio", "target", "pass")
COLUMNS = ("suite", "measure", "a", "a_value", "b", "b_value", "unit", "ratio", "target", "pass", "settings")


def machine_info() -> dict[str, str]:
    import onnxruntime
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()),
            "load average at start": load, "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "os": platform.platform()}


def markdown(command: str, date: str, machine: dict[str, str], rows: list[dict[str, Any]],
             tables: dict[str, list[dict[str, Any]]], seconds: float) -> str:
    """A self-contained Markdown section: how it was produced, on what, and the results."""
    lines = [f"## shrink bench results ({date})", "", f"Command: `{command}` (took {seconds:.0f} s)", "",
             "Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()), "",
             "A and B were measured interleaved in the same run (warm-up first, median of the repeats); "
             "`ratio` is as named in each measure (a speed-up, or engine/bare rate), compared with `target`.", ""]
    lines += _table(rows, COLUMNS)
    for title, table in tables.items():
        if table:
            lines += ["", f"### {title}", ""] + _table(table, tuple(table[0]))
    return "\n".join(lines) + "\n"


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> list[str]:
    def cell(value: Any) -> str:
        return "" if value is None else str(value).replace("|", "\\|")

    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows])


def run(*, suite: str = "all", output: str | None = None, quick: bool = False,
        weights: str | None = None) -> dict[str, Any]:
    chosen = list(SUITES) if suite == "all" else [suite]
    if any(name not in SUITES for name in chosen):
        raise BadInputError(f"unknown benchmark suite {suite!r}", hint=f"use all or one of: {', '.join(SUITES)}")
    if weights and "deploy" not in chosen:
        raise BadInputError("--weights applies to the deploy suite", hint="shrink bench deploy --weights FILE")
    machine = machine_info()
    date = time.strftime("%Y-%m-%d %H:%M")
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    tables: dict[str, list[dict[str, Any]]] = {}
    for name in chosen:
        log.info(f"bench: suite {name}{' (quick)' if quick else ''}")
        extra = {"weights": weights} if weights and name == "deploy" else {}
        result = importlib.import_module(f"shrinkcli.bench.{name}").run(quick=quick, **extra)
        rows += result["rows"]
        tables.update(result.get("tables", {}))
    seconds = time.perf_counter() - started
    command = "shrink bench" + ("" if suite == "all" else f" {suite}") + (" --quick" if quick else "")
    command += f" --weights {weights}" if weights else ""
    if output:
        from pathlib import Path

        from shrinkcli.atomic import atomic_write_text

        command += f" --output {output}"
        atomic_write_text(Path(output), markdown(command, date, machine, rows, tables, seconds))
    failed = sum(row["pass"] == "FAIL" for row in rows)
    summary = {"suites": ",".join(chosen), "rows": len(rows), "passed": sum(row["pass"] == "pass" for row in rows),
               "failed": failed, "seconds": round(seconds, 1), "output": output,
               "torch_threads": machine["torch threads"], "argv": " ".join(sys.argv[1:]) or command}
    compact = [{k: row[k] for k in TERMINAL_COLUMNS} for row in rows]   # settings go to the Markdown file
    return {"summary": summary, "rows": rows, "tables": {"bench": compact, **tables}}
