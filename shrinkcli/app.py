"""The Typer application object, global options, and how a command runs a stage and prints.

Nothing here computes anything; heavy imports (torch) happen inside the stage modules so that
`shrink --help` stays fast. Commands are registered on `app` by `shrinkcli.commands`; the entry
point is `shrinkcli.cli`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
import typer.core

from shrinkcli import __version__
from shrinkcli import log
from shrinkcli.atomic import strict_json
from shrinkcli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, ShrinkError

GLOBAL_FLAGS = ("--json", "--quiet", "-q", "--verbose", "-v")


class GlobalFlagsAnywhere(typer.core.TyperGroup):
    """`shrink verify ... --json` means `shrink --json verify ...`: scripts write it both ways."""

    def parse_args(self, ctx, args):
        cut = args.index("--") if "--" in args else len(args)
        head, tail = list(args[:cut]), list(args[cut:])
        front = [a for a in head if a in GLOBAL_FLAGS]
        rest = [a for a in head if a not in GLOBAL_FLAGS]
        return super().parse_args(ctx, front + rest + tail)


app = typer.Typer(
    name="shrink",
    cls=GlobalFlagsAnywhere,
    help="Compress face-recognition teachers into portable students (ShrinkTeaNet angular distillation).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Pack and inspect face datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_global = {"json": False, "quiet": False}

PROJECT = typer.Option("runs", "--project", help="Parent folder of run dirs.")
NAME = typer.Option(None, "--name", help="Run name (default: auto-numbered stage, stage2, ...).")
RUN_DIR = typer.Option(None, "--run-dir", help="Exact run dir to write (overrides --project/--name).")
EXIST_OK = typer.Option(False, "--exist-ok", help="Reuse an existing run dir.")
CONFIG = typer.Option(None, "--config", "-c", help="TOML recipe whose table for this stage sets defaults.")
SET = typer.Option(None, "--set", help="Override any config key: --set key=value (repeatable).")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shrink {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout; logs go to stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """shrink: teacher -> distill -> export -> verify, chained through run directories.

    Exit codes: 0 ok, 1 a gate or check failed, 2 bad input or usage, 3 internal error, 130 interrupted.
    """
    _global.update(json=json_output, quiet=quiet)
    log.configure(quiet=quiet, json_mode=json_output, verbose=verbose)


def _print_result(result: dict[str, Any]) -> None:
    if _global["json"]:
        sys.stdout.write(strict_json(result) + "\n")
        return
    if _global["quiet"]:
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for title, rows in result.get("tables", {}).items():
        if not rows:
            continue
        table = Table(title=title)
        for column in rows[0]:
            table.add_column(str(column))
        for row in rows:
            table.add_row(*[_fmt(v) for v in row.values()])
        console.print(table)
    summary = result.get("summary") or {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    table = Table(show_header=False, box=None)
    for key, value in summary.items():
        table.add_row(str(key), _fmt(value))
    console.print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _run(fn: Callable[[], dict[str, Any]]) -> None:
    """Call a stage; map exceptions to one line on stderr and a documented exit code. Every run dir
    the stage began and left `running` is marked with what ended it (`close_open_runs`)."""
    from shrinkcli.errors import TrainingDivergedError
    from shrinkcli.rundir import close_open_runs

    close_open_runs()       # locks left by an earlier call in this process (tests call the app repeatedly)
    try:
        result = fn()
    except ShrinkError as exc:
        close_open_runs("diverged" if isinstance(exc, TrainingDivergedError) else "failed", str(exc))
        if getattr(exc, "result", None) and _global["json"]:
            sys.stdout.write(strict_json(exc.result) + "\n")
        typer.echo(f"shrink: error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        close_open_runs("interrupted", "interrupted (Ctrl-C)")
        typer.echo("shrink: interrupted (resume with --resume RUN_DIR where the stage supports it)", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except typer.Exit:
        close_open_runs("failed", "exited")
        raise
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no tracebacks for users
        close_open_runs("failed", f"internal error: {type(exc).__name__}: {exc}")
        if os.environ.get("SHRINK_DEBUG"):
            raise
        typer.echo(f"shrink: internal error: {type(exc).__name__}: {exc} "
                   "(set SHRINK_DEBUG=1 for the traceback and report it)", err=True)
        raise typer.Exit(EXIT_INTERNAL) from None
    close_open_runs()
    _print_result(result or {})


def _build_config(stage: str, recipe: Optional[Path], options: dict[str, Any], overrides: Optional[List[str]]):
    """Recipe table (if any) < explicit options < --set overrides, validated once."""
    from shrinkcli.config import STAGE_CONFIGS, load_recipe, stage_config_from_recipe
    from shrinkcli.fields import parse_overrides

    if recipe is not None:
        config = stage_config_from_recipe(load_recipe(recipe), stage, str(recipe))  # fields: source "recipe"
    else:
        config = STAGE_CONFIGS[stage]()
    # One validation of options and overrides together: `--no-labels --set ekd_weight=1` is valid
    # only as a whole, so validating the options alone first would refuse it.
    given = {k: v for k, v in options.items() if v is not None}
    sets = parse_overrides(overrides)
    if not given and not sets:
        return config
    sources = {**config.sources, **{k: "option" for k in given}, **{k: "--set" for k in sets}}
    return type(config).from_dict({**config.to_dict(), **given, **sets}, "option", sources=sources)


@app.command()
def info() -> None:
    """Versions, compute device and threads."""

    def work() -> dict[str, Any]:
        import torch

        from shrinkcli.rundir import describe_device, package_versions

        return {"summary": {**package_versions(), "device": describe_device(),
                            "cuda": torch.cuda.is_available(), "threads": torch.get_num_threads(),
                            "interop_threads": torch.get_num_interop_threads()}}

    _run(work)


def call_stage(entry: Callable[..., dict[str, Any]], *args: Any, config: Optional[Callable[[], Any]] = None,
               **kwargs: Any) -> None:
    """Call a stage entry; `config` builds the stage's config inside the error handler so that a
    bad recipe or option is one clear line too."""

    def work() -> dict[str, Any]:
        built = (config(),) if config else ()
        return entry(*built, *args, **kwargs)

    _run(work)
