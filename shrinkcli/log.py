"""Logging to stderr (stdout is reserved for results, e.g. `--json`) and TTY-aware progress."""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("shrink")
_state = {"quiet": False, "json": False}
_live: dict[str, object] = {"console": None}


class _Handler(logging.Handler):
    """stderr, or through the live progress bar's console, so a message printed while the bar is
    drawn gets its own line above the bar instead of being glued to its end."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            console = _live["console"]
            if console is not None:
                console.print(message, markup=False, highlight=False, soft_wrap=True)
            else:
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def set_live_console(console) -> None:
    """Route log lines through `console` (a rich Console drawing a live bar); None to stop."""
    _live["console"] = console


def configure(*, quiet: bool = False, json_mode: bool = False, verbose: bool = False) -> None:
    _state.update(quiet=quiet, json=json_mode)
    LOGGER.handlers.clear()
    handler = _Handler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO))
    LOGGER.propagate = False


def info(message: str) -> None:
    LOGGER.info(message)


def warning(message: str) -> None:
    LOGGER.warning(f"warning: {message}")


def debug(message: str) -> None:
    LOGGER.debug(message)


def show_progress() -> bool:
    """Progress bars only for a person at a terminal, never in logs or CI."""
    return not _state["quiet"] and sys.stderr.isatty()

