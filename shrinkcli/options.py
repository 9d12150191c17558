"""Command-line options generated from a stage's config dataclass.

Each config field is declared once, in `shrinkcli.config`, with its type, default and help text;
`stage_command` turns every field into an option (`--field-name`, booleans as `--x/--no-x`) whose
help shows the field's real default. An option left out stays None, so the config records only
what the user actually gave (see `Config.is_set`).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Callable, Optional

import typer

# Short forms and historical spellings that users' scripts rely on.
ALIASES: dict[str, tuple[str, ...]] = {
    "data": ("--data", "-d"), "teacher": ("--teacher", "-t"), "student": ("--student", "-s"),
    "model": ("--model", "-m"), "reference": ("--reference", "-r"), "format": ("--format", "-f"),
    "out": ("--out", "-o"),
}
FLAGS: dict[str, str] = {
    "include_preprocess": "--include-preprocess/--no-preprocess",
    "normalize_output": "--l2-normalize/--no-l2-normalize",
}


def _base_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")) and len(args) == 1:
        return _base_type(args[0])
    return tp


def _metavar(tp: Any) -> str:
    base = _base_type(tp)
    if typing.get_origin(base) is typing.Literal:
        return "[" + "|".join(str(a) for a in typing.get_args(base)) + "]"
    if typing.get_origin(base) in (list, tuple):
        return "A,B,..."
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(base, "VALUE")


def _shown_default(field: dataclasses.Field) -> str:
    value = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "empty"
    return str(value)


def config_parameters(cls: type, *, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword parameter per config field, typed so Typer parses flags and leaves values as
    text for the config to check (one error format for options, `--set` and recipes)."""
    hints = typing.get_type_hints(cls)
    params = []
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        help_text = field.metadata.get("help")
        if not help_text:
            raise TypeError(f"{cls.__name__}.{field.name} has no help text")
        is_flag = _base_type(hints[field.name]) is bool
        dashed = "--" + field.name.replace("_", "-")
        if is_flag:
            decls = (FLAGS.get(field.name, f"{dashed}/--no-{field.name.replace('_', '-')}"),)
            option = typer.Option(None, *decls, help=help_text, show_default=_shown_default(field))
            annotation = Optional[bool]
        else:
            decls = ALIASES.get(field.name, (dashed,))
            option = typer.Option(None, *decls, help=help_text, show_default=_shown_default(field),
                                  metavar=_metavar(hints[field.name]))
            annotation = Optional[str]
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=annotation))
    return params


def stage_command(app: typer.Typer, name: str, cls: type, handler: Callable[[dict[str, Any], dict[str, Any]], None],
                  *, doc: str, extra: list[inspect.Parameter], positional: list[inspect.Parameter] = ()) -> None:
    """Register `shrink NAME`: the config's fields as options plus `extra` parameters. `handler`
    receives (field values given on the command line, extra values); a `positional` parameter
    named after a field (embed's MODEL) is a field value too."""
    taken = {p.name for p in (*positional, *extra)}
    fields = config_parameters(cls, skip=tuple(taken))
    field_names = {p.name for p in fields} | {p.name for p in positional if p.name in cls.__dataclass_fields__}

    def command(**kwargs: Any) -> None:
        values = {k: kwargs.pop(k) for k in list(kwargs) if k in field_names}
        handler(values, kwargs)

    params = [*positional, *fields, *extra]
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    command.__name__ = name
    app.command(name)(command)


def parameter(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
