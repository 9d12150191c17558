"""The Python API: one function per stage, keyword arguments equal to the stage's config fields.

    from shrinkcli.api import teacher, distill, export, verify
    result = distill(teacher="runs/teacher/teacher", data="synthetic:48:10:0", epochs=2, run_dir="runs/s")

Each function builds the stage's config from its keyword arguments (recorded as set by "python",
validated like options and recipes), runs the stage exactly as the CLI does and returns the result
dict the CLI prints with `--json`. Bad input raises `shrinkcli.errors.BadInputError`; a failed gate
raises `shrinkcli.errors.GateFailedError` (both carry `exit_code`). Besides the config fields each
function takes the run-dir keywords `project`, `name`, `run_dir`, `exist_ok` and, for training
stages, `resume`.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Callable, Optional

from shrinkcli.config import STAGE_CONFIGS
from shrinkcli.rundir import RunOptions

_RUN_KEYWORDS = {"project": (str, "runs"), "name": (Optional[str], None), "run_dir": (Optional[str], None),
                 "exist_ok": (bool, False), "resume": (Optional[str], None)}


def _stage_function(stage: str) -> Callable[..., dict[str, Any]]:
    cls = STAGE_CONFIGS[stage]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    run_keywords = {k: v for k, v in _RUN_KEYWORDS.items() if k != "resume" or stage in ("teacher", "distill")}

    def call(**kwargs: Any) -> dict[str, Any]:
        from shrinkcli.errors import BadInputError
        from shrinkcli.stages.registry import STAGES

        unknown = sorted(set(kwargs) - set(fields) - set(run_keywords))
        if unknown:
            raise BadInputError(f"shrinkcli.api.{stage}(): unknown keyword(s) {', '.join(unknown)}",
                                hint=f"see help(shrinkcli.api.{stage})")
        where = {k: kwargs.pop(k) for k in list(kwargs) if k in run_keywords}
        config = cls.from_dict(kwargs, f"{stage}()", source="python")
        options = RunOptions(project=str(where.get("project", "runs")), name=where.get("name"),
                             run_dir=str(where["run_dir"]) if where.get("run_dir") else None,
                             exist_ok=bool(where.get("exist_ok", False)), resume=where.get("resume"))
        return STAGES[stage](config, options)

    def default(field: dataclasses.Field) -> Any:
        return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default

    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default(f), annotation=hints[name])
              for name, f in fields.items()]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=tp)
               for name, (tp, value) in run_keywords.items()]
    call.__signature__ = inspect.Signature(params, return_annotation=dict[str, Any])
    call.__name__ = call.__qualname__ = stage
    lines = [f"Run `shrink {stage}` from Python; returns the result dict.", "", "Keyword arguments:"]
    lines += [f"    {name}: {f.metadata.get('help', '')}" for name, f in fields.items()]
    call.__doc__ = "\n".join(lines)
    return call


teacher = _stage_function("teacher")
distill = _stage_function("distill")
export = _stage_function("export")
verify = _stage_function("verify")
embed = _stage_function("embed")

__all__ = ["teacher", "distill", "export", "verify", "embed"]
