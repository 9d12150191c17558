"""Typed config fields: coercion of recipe and command-line values, numeric bounds, `key=value` overrides.

Every value a user gives (a TOML key, a CLI option, a `--set`) passes `coerce` against the field's
annotation and `check_bounds` against the bounds its `opt(...)` declares, so the error names the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

from shrinkcli.errors import BadInputError


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`; strings from the command line are parsed."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        choices = [a for a in args if a is not type(None)]
        if len(choices) == 1:               # Optional[X]: X's own message says what is wrong
            return coerce(value, choices[0], where)
        for arg in choices:             # the first that accepts the value wins; the message names them all
            try:
                return coerce(value, arg, where)
            except BadInputError:
                pass
        raise BadInputError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise BadInputError(f"{where}: must be one of {', '.join(map(str, args))}, got {value!r}")
    if origin in (list, tuple):
        inner = args[0] if args else Any
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise BadInputError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise BadInputError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise BadInputError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise BadInputError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise BadInputError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):
            # no setting of shrink means anything at nan or inf; refusing here keeps them out of every stage
            raise BadInputError(f"{where}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise BadInputError(f"{where}: expected a string, got {value!r}")
    return value


def parse_overrides(overrides: list[str] | None) -> dict[str, str]:
    """`["epochs=3", "stage-weights=1,0,0,1"]` -> `{"epochs": "3", "stage_weights": "1,0,0,1"}` (not yet coerced)."""
    changes: dict[str, str] = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise BadInputError(f"override {item!r} is not key=value", hint="e.g. --set epochs=3")
        changes[key.strip().replace("-", "_")] = value.strip()
    return changes


def opt(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A config field with its help text: the CLI options and `--help` are generated from it.
    `ge`/`gt`/`le`/`lt` bound a number (each element of a list; None always passes), checked
    wherever a config is built, so a value out of range never reaches a stage."""
    metadata = {"help": help, "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
                                         if v is not None}}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_TEST = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b,
               "lt": lambda v, b: v < b}


def check_bounds(name: str, value: Any, bounds: dict[str, float], where: str) -> None:
    """BadInputError naming `where.name` when `value` (or an element of it) is outside `bounds`."""
    if not bounds or value is None or isinstance(value, bool):
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for item in values:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        broken = [k for k, b in bounds.items() if not _BOUND_TEST[k](item, b)]
        if broken:
            wanted = " and ".join(f"{_BOUND_TEXT[k]} {bounds[k]:g}" for k in bounds)
            raise BadInputError(f"{where}.{name}={item!r} is out of range: it must be {wanted}")
