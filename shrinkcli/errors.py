"""Exceptions that map to shrink's documented exit codes.

Every stage raises these instead of printing; the CLI turns them into one line on stderr and
the exit code below, so scripted pipelines can branch on the code alone.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):"


def _strip_worker_traceback(message: str) -> str:
    """torch's DataLoader re-raises a worker's exception as `type(exc)(<the worker's traceback>)`;
    keep only the original one-line message, the traceback's last line after `module.Class: `."""
    if _WORKER_TRACEBACK not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


class ShrinkError(Exception):
    """Base class: a problem the user can act on. `exit_code` is what the CLI returns."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, hint: str | None = None):
        message = _strip_worker_traceback(message)
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class BadInputError(ShrinkError):
    """A file, option or dataset that cannot be used as given (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class GateFailedError(ShrinkError):
    """A verification gate or automatic check did not pass (exit 1)."""

    exit_code = EXIT_GATE_FAILED

    def __init__(self, message: str, *, hint: str | None = None, result: dict | None = None):
        super().__init__(message, hint=hint)
        self.result = result or {}


class TrainingDivergedError(ShrinkError):
    """The loss became NaN/inf and the run was configured to stop (exit 1)."""

    exit_code = EXIT_GATE_FAILED
