"""Whether a stage's run dir is up to date with a config: fresh, done, resumable or stale.

Used by `shrink pipeline` and by `[experiment]` studies to skip finished work and resume
interrupted work.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from shrinkcli.atomic import sha256_file
from shrinkcli.errors import BadInputError
from shrinkcli.rundir import MANIFEST, load_manifest


def _normalised(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, default=str))


def _same_config(saved: dict[str, Any], config: Any) -> bool:
    """Equal configs, where a key the saved run does not know (an option added in a later version)
    counts as equal unless this config sets it: upgrading shrink must not re-run finished studies."""
    current = _normalised(config.to_dict() if hasattr(config, "to_dict") else config)
    saved = _normalised(saved)
    if hasattr(config, "is_set"):
        for key in set(current) - set(saved):
            if not config.is_set(key):
                del current[key]
    return saved == current


def stage_state(run_dir: Path, config: Any) -> str:
    """'fresh' (nothing there), 'done' (up to date), 'resumable' or 'stale'."""
    if not (run_dir / MANIFEST).is_file():
        return "fresh"
    try:
        manifest = load_manifest(run_dir)
    except BadInputError:
        return "stale"
    if not _same_config(manifest.get("config", {}), config):
        return "stale"
    if manifest.get("status") != "completed":
        return "resumable" if (run_dir / "weights" / "last.pt").is_file() else "stale"
    for record in manifest.get("inputs", []) + manifest.get("outputs", []):
        if not record.get("sha256") or not record.get("path"):
            continue  # a data spec such as synthetic:64 is no file; the config already pins it
        path = Path(record["path"])
        path = path if path.is_absolute() else run_dir / path
        if not path.is_file() or sha256_file(path) != record["sha256"]:
            return "stale"
    return "done"


def prepare_stage(run_dir: Path, config: Any, *, force: bool = False) -> tuple[str, str | None]:
    """(state, resume source): an up-to-date stage is 'done'; a stale one is removed so its
    outputs are replaced, not mixed; a resumable one resumes from its own run dir."""
    state = "stale" if force and (run_dir / MANIFEST).exists() else stage_state(run_dir, config)
    if state == "stale":
        shutil.rmtree(run_dir)
    return state, (str(run_dir) if state == "resumable" else None)
