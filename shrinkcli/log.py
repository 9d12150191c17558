"""Logging to stderr (stdout is reserved for results, e.g. `--json`) and TTY-aware progress."""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("shrink")
_state = {"quiet": False, "json": False}


def configure(*, quiet: bool = False, json_mode: bool = False, verbose: bool = False) -> None:
    _state.update(quiet=quiet, json=json_mode)
    LOGGER.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
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


def is_quiet() -> bool:
    return _state["quiet"]
