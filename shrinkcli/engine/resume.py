"""Resolving `--resume` for a stage: which checkpoint, which run dir, which config.

A resumed run continues in the run dir that holds the checkpoint (its manifest is reopened and
updated, never replaced), so a run dir always describes one training run from epoch 0 to the end.
The configuration is the checkpoint's, except for keys the caller set (by option, `--set` or
recipe, e.g. `--epochs 20` to train longer, whatever the default is) and keys that only concern
this invocation (device, workers, max_steps, log_every).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from shrinkcli.errors import BadInputError

PER_INVOCATION = ("device", "workers", "max_steps", "log_every")


def checkpoint_path(resume: str | Path) -> Path:
    path = Path(resume)
    if path.is_dir():
        path = path / "weights" / "last.pt"
    if not path.is_file():
        raise BadInputError(f"nothing to resume at {resume}: {path} does not exist",
                            hint="pass a run dir with weights/last.pt or the checkpoint file itself")
    return path


def owning_run_dir(checkpoint: Path) -> Path | None:
    """The run dir a checkpoint lives in (`<run>/weights/last.pt`), if it has a manifest."""
    candidate = checkpoint.resolve().parent.parent
    return candidate if (candidate / "manifest.json").is_file() else None


def merge_config(saved: dict[str, Any], given):
    """The checkpoint's config, overridden by every field the caller set (and the per-invocation keys)."""
    cls = type(given)
    names = {f.name for f in dataclasses.fields(cls)}
    merged = {k: v for k, v in saved.items() if k in names}
    sources = {k: "resume" for k in merged}
    for name in names:
        if name in PER_INVOCATION or given.is_set(name):
            merged[name] = getattr(given, name)
            if given.is_set(name):
                sources[name] = given.source(name)
    return cls.from_dict(merged, "resumed config", sources=sources)


def resume_run(resume: str | Path, stage: str, given_config, run_options, *, is_main: bool = True):
    """(run dir or None on non-main ranks, checkpoint path, merged config) for `--resume`."""
    from shrinkcli.engine.checkpoint import load_checkpoint
    from shrinkcli.rundir import RunDir

    path = checkpoint_path(resume)
    state = load_checkpoint(path)
    config = merge_config(state.get("config", {}), given_config)
    if not is_main:
        return None, path, config
    owner = owning_run_dir(path)
    if owner is None:
        run_dir = run_options.create(stage, config.to_dict())
    else:
        run_dir = RunDir(owner, stage, config.to_dict())
        run_dir.begun = False       # the manifest stays as it is until the stage calls `run_dir.begin()`
        run_dir.lock()
        try:
            previous = json.loads((owner / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BadInputError(f"cannot read {owner / 'manifest.json'}: {exc}") from exc
        if previous.get("stage") not in (None, stage):
            raise BadInputError(f"{owner} is a {previous.get('stage')} run, not a {stage} run",
                                hint=f"resume it with `shrink {previous.get('stage')} --resume {owner}`")
        for key in ("inputs", "outputs", "results", "started", "name", "status", "finished", "error"):
            if key in previous:
                run_dir.manifest[key] = previous[key]
    return run_dir, path, config
