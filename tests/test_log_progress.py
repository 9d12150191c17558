"""A log line printed while a progress bar is live gets its own line, above the bar."""

from __future__ import annotations

import io
import re

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from shrinkcli import log


def test_log_line_during_a_live_bar_is_on_its_own_line():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    log.configure()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), console=console)
    bar.start()
    task = bar.add_task("epoch 1", total=10)
    log.set_live_console(bar.console)
    try:
        bar.update(task, completed=5)
        bar.refresh()
        log.info("epoch 1 step 5 loss 2.5 val_accuracy 0.8")
        bar.update(task, completed=10)
    finally:
        bar.stop()
        log.set_live_console(None)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue())
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    assert "epoch 1 step 5 loss 2.5 val_accuracy 0.8" in lines, lines
