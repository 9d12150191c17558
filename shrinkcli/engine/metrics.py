"""Training metrics on disk (metrics.jsonl per log step, metrics.csv per epoch, curves.png) and the
console view (a rich progress bar at a terminal, plain lines otherwise)."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

from shrinkcli import log
from shrinkcli.atomic import atomic_write_bytes, atomic_write_text


class MetricsFiles:
    """Append-only step log and rewritten epoch table; on resume, lines past the resumed step
    (written by the interrupted run after its last checkpoint) are dropped so each step appears once."""

    def __init__(self, run_dir: Path | None, resume_step: int | None = None):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.epoch_rows: list[dict[str, Any]] = []
        if self.run_dir is None:
            return
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        if resume_step is None:
            for path in (self.jsonl, self.csv):
                path.unlink(missing_ok=True)
            return
        kept = [r for r in self.read_steps() if r.get("step", 0) <= resume_step]
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        if self.csv.is_file():
            with open(self.csv, newline="") as handle:
                self.epoch_rows = [r for r in csv.DictReader(handle) if int(float(r["step"])) <= resume_step]

    def read_steps(self) -> list[dict[str, Any]]:
        if self.run_dir is None or not self.jsonl.is_file():
            return []
        rows = []
        for line in self.jsonl.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a crash
        return rows

    def log_step(self, record: dict[str, Any]) -> None:
        if self.run_dir is None:
            return
        with open(self.jsonl, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def log_epoch(self, record: dict[str, Any]) -> None:
        if self.run_dir is None:
            return
        self.epoch_rows.append(record)
        columns: list[str] = []
        for row in self.epoch_rows:
            columns += [k for k in row if k not in columns]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.epoch_rows)
        atomic_write_text(self.csv, out.getvalue())

    def plot(self) -> Path | None:
        """Loss per step and validation accuracy per epoch as one PNG (None when nothing to plot)."""
        steps = [r for r in self.read_steps() if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
        if self.run_dir is None or not steps:
            return None
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        accuracy = [(float(r["epoch"]), float(r["val_accuracy"])) for r in self.epoch_rows
                    if r.get("val_accuracy") not in (None, "")]
        fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(10 if accuracy else 5, 3.5), squeeze=False)
        axes[0][0].plot([r["step"] for r in steps], [r["loss"] for r in steps])
        axes[0][0].set(xlabel="step", ylabel="loss", title="training loss")
        if accuracy:
            axes[0][1].plot(*zip(*accuracy), marker="o")
            axes[0][1].set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        return atomic_write_bytes(self.run_dir / "curves.png", buffer.getvalue())


class ProgressView:
    """Rich progress bar for a person at a terminal; plain log lines every `log_every` steps otherwise."""

    def __init__(self, enabled: bool, total_steps: int, done_steps: int, log_every: int):
        self.total = total_steps
        self.log_every = max(1, log_every)
        self.started = time.perf_counter()
        self.start_step = done_steps
        self.bar = None
        if enabled and log.show_progress():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False,
                                console=Console(stderr=True))
            self.bar.start()
            log.set_live_console(self.bar.console)
            self.task = self.bar.add_task("train", total=total_steps, completed=done_steps, info="")
        self.enabled = enabled

    def update(self, step: int, epoch: int, logs: dict[str, Any], force_line: bool = False) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k} {_short(v)}" for k, v in logs.items())
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=f"epoch {epoch}", info=text)
        elif force_line or step % self.log_every == 0:
            elapsed = time.perf_counter() - self.started
            done = step - self.start_step
            eta = elapsed / done * (self.total - step) if done else float("nan")
            log.info(f"epoch {epoch} step {step}/{self.total} {text} eta {_duration(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            log.set_live_console(None)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
