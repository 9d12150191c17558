"""The stage registry: name -> entry. Every entry is `run(config, run_options) -> result dict`,
with `config` the stage's dataclass from `shrinkcli.config.STAGE_CONFIGS`."""

from __future__ import annotations

from typing import Any, Callable

from shrinkcli.stages import distill, embed, export, teacher, verify

STAGES: dict[str, Callable[..., dict[str, Any]]] = {
    "teacher": teacher.run,
    "distill": distill.run,
    "export": export.run,
    "verify": verify.run,
    "embed": embed.run,
}
