"""The `shrink` entry point: the Typer app with every command registered."""

from __future__ import annotations

from shrinkcli.app import app
from shrinkcli import commands  # noqa: F401  (registers the commands on `app`)

__all__ = ["app", "main"]


def main() -> None:
    app()
