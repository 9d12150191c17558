"""Run directories: `runs/<stage>/<name>` with a manifest of every input and output artifact.

Each stage creates one `RunDir`, registers the artifacts it reads and writes, and the manifest
(`manifest.json`) records stage, resolved config, versions, device, git commit, times and each
artifact's sha256, so a later stage can find its input from the run dir alone and detect tampering.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from shrinkcli import __version__
from shrinkcli.atomic import atomic_write_json, remove_stale_temps, sha256_file
from shrinkcli.errors import BadInputError

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
LOCK = ".lock"
# Run dirs this process created or reopened, so that whatever ends the command (an error, Ctrl-C)
# can mark each one that is still `running` with what happened (see `close_open_runs`).
_OPEN: list["RunDir"] = []


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    versions = {"shrink": __version__, "python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "numpy", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def describe_device() -> str:
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"cuda x{count} ({torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def check_name(name: str, what: str = "run name") -> str:
    """A name that becomes one path part: no separators, no `..`, no leading dot (hidden,
    and shrink's own temporary files start with one), printable, at most 128 characters."""
    if (not isinstance(name, str) or not name or len(name) > 128 or name.startswith(".") or ".." in name
            or any(c in name for c in "/\\") or not name.isprintable()):
        raise BadInputError(f"{what} {name!r} is not usable as a folder name",
                            hint="use letters, digits and . _ + - (no '/', no '..', not starting with a dot)")
    return name


def next_run_path(parent: Path, stem: str) -> Path:
    """Create and return the first free `parent/stem`, `stem2`, `stem3`, ...

    `mkdir` is the claim: it fails when another process got there first, so concurrent runs
    under one parent always get distinct directories.
    """
    parent.mkdir(parents=True, exist_ok=True)
    taken = {p.name for p in parent.iterdir()}
    pattern = re.compile(rf"^{re.escape(stem)}(\d*)$")
    numbers = [int(m.group(1) or 1) for n in taken if (m := pattern.match(n))]
    index = max(numbers, default=0) + 1
    while True:
        candidate = parent / (stem if index == 1 else f"{stem}{index}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            index += 1


@dataclass
class Artifact:
    path: Path
    kind: str
    sha256: str
    run_dir: Path | None = None

    def as_record(self, relative_to: Path | None = None) -> dict[str, str]:
        path = self.path
        if relative_to is not None:
            try:
                path = self.path.resolve().relative_to(relative_to.resolve())
            except ValueError:
                path = self.path.resolve()
        return {"path": str(path), "kind": self.kind, "sha256": self.sha256}


class RunDir:
    """One stage's run directory and its manifest."""

    def __init__(self, path: Path, stage: str, config: dict[str, Any] | None = None):
        self.path = Path(path)
        self.stage = stage
        self.manifest: dict[str, Any] = {
            "schema": MANIFEST_SCHEMA,
            "stage": stage,
            "name": self.path.name,
            "status": "running",
            "config": config or {},
            "versions": package_versions(),
            "device": None,
            "git_commit": git_commit(),
            "started": _now(),
            "finished": None,
            "inputs": [],
            "outputs": [],
            "results": {},
        }
        self._lock_fd: int | None = None
        self.begun = True   # False for a resumed run until `begin`: its manifest is not touched before
        _OPEN.append(self)

    def lock(self) -> None:
        """Hold an exclusive lock on the run dir for this process: a second shrink process writing
        the same run dir would mix its metrics and weights into this one's."""
        import fcntl

        if self._lock_fd is not None:
            return
        here = self.path.resolve()
        for other in list(_OPEN):
            # Within one process nothing runs two stages in one dir at once: an older handle still
            # holding it was left by an earlier call that raised, so this one takes it over.
            if other is not self and other._lock_fd is not None and other.path.resolve() == here:
                other.unlock()
                _OPEN.remove(other)
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise BadInputError(f"cannot lock run dir {self.path}: {exc.strerror or exc}",
                                hint="choose a writable --project/--run-dir") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise BadInputError(f"run dir {self.path} is in use by another shrink process",
                                    hint="wait for it to finish or choose another --name/--run-dir") from None
            raise BadInputError(f"cannot lock run dir {self.path}: {exc.strerror or exc}") from exc
        self._lock_fd = fd
        # Holding the lock, no other shrink writes here: temp files a kill -9 left can go.
        for folder in (self.path, self.path / "weights"):
            remove_stale_temps(folder)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # closing the descriptor releases the flock
            self._lock_fd = None

    def begin(self) -> None:
        """A resumed run starts here, after its inputs were validated: only now is it `running`."""
        if not self.begun:
            self.begun = True
            self.manifest["status"] = "running"
            self.manifest.pop("error", None)
            self.manifest["finished"] = None
            self.save()

    @classmethod
    def create(cls, stage: str, *, root: str | os.PathLike = "runs", name: str | None = None,
               run_dir: str | os.PathLike | None = None, exist_ok: bool = False,
               config: dict[str, Any] | None = None) -> "RunDir":
        """Make `root/stage/<name or auto-numbered stage>` (or exactly `run_dir`) and its manifest."""
        if run_dir is not None:
            path = Path(run_dir)
        elif name is not None:
            path = Path(root) / stage / check_name(name)
        else:
            path = None
        try:
            if path is None:
                path = next_run_path(Path(root) / stage, stage)
            elif path.exists() and not exist_ok:
                raise BadInputError(f"run dir {path} already exists",
                                    hint="pass --exist-ok to reuse it or choose another --name")
            else:
                path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # permission denied, a file in the way, a read-only or full disk
            raise BadInputError(f"cannot create run dir under {path or root}: {exc.strerror or exc}",
                                hint="choose a writable --project/--run-dir") from exc
        run = cls(path, stage, config)
        try:
            run.lock()
        except BadInputError:
            _OPEN.remove(run)
            raise
        run.save()
        return run

    def file(self, relative: str) -> Path:
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def set_device(self, device: str) -> None:
        self.manifest["device"] = device

    def add_input(self, path: str | os.PathLike | Artifact, kind: str) -> Artifact:
        art = path if isinstance(path, Artifact) else Artifact(Path(path), kind, sha256_file(path))
        art = Artifact(art.path, kind, art.sha256, art.run_dir)
        record = art.as_record()
        record["path"] = str(Path(art.path).resolve())
        if art.run_dir is not None:
            record["run_dir"] = str(Path(art.run_dir).resolve())
        self.manifest["inputs"] = [r for r in self.manifest["inputs"] if r["kind"] != kind or r["path"] != record["path"]]
        self.manifest["inputs"].append(record)
        self.save()
        return art

    def add_output(self, path: str | os.PathLike, kind: str) -> Artifact:
        art = Artifact(Path(path), kind, sha256_file(path), self.path)
        record = art.as_record(self.path)
        self.manifest["outputs"] = [r for r in self.manifest["outputs"] if r["path"] != record["path"]]
        self.manifest["outputs"].append(record)
        self.save()
        return art

    def set_results(self, **results: Any) -> None:
        self.manifest["results"].update(results)
        self.save()

    def finish(self, status: str = "completed", error: str | None = None) -> None:
        self.manifest["status"] = status
        self.manifest["finished"] = _now()
        if error:
            self.manifest["error"] = error
        self.save()
        self.unlock()
        if status == "completed" and self in _OPEN:
            _OPEN.remove(self)

    def save(self) -> None:
        atomic_write_json(self.path / MANIFEST, self.manifest)


def close_open_runs(status: str | None = None, error: str | None = None) -> None:
    """End of a command: with `status` (it failed), every run dir it began that is still `running`
    is marked `status` and each one not `completed` gets the error line; then all locks are released.
    A resumed run that never began (its resume was refused) keeps its manifest untouched."""
    while _OPEN:
        run = _OPEN.pop()
        try:
            if status is not None and run.begun and (run.path / MANIFEST).is_file():
                if run.manifest.get("status") == "running":
                    run.finish(status, error)
                elif run.manifest.get("status") != "completed" and error and not run.manifest.get("error"):
                    run.manifest["error"] = error
                    run.save()
        except Exception:  # noqa: BLE001 - marking is best effort (a full disk); the error itself is reported
            pass
        finally:
            run.unlock()


def load_manifest(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise BadInputError(f"{run_dir} is not a shrink run dir (no {MANIFEST})",
                            hint="pass a run dir created by a shrink stage or a weights file")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or "outputs" not in manifest:
        raise BadInputError(f"{path} is not a shrink manifest (no 'outputs')")
    if not isinstance(manifest["outputs"], list) or not isinstance(manifest.get("inputs", []), list):
        raise BadInputError(f"{path}: 'outputs' and 'inputs' must be lists",
                            hint="the manifest was edited or is damaged; re-run the stage that made it")
    return manifest


def resolve_artifact(source: str | os.PathLike, kinds: str | Iterable[str], *,
                     verify: bool = True, allow_incomplete: bool = False) -> Artifact:
    """A file as is, or from a run dir the newest output whose kind is in `kinds` (in order of preference).

    With `verify`, the file's sha256 must match the manifest: a changed file is refused. A run dir
    whose run did not complete (failed, interrupted, still running) is refused unless
    `allow_incomplete`: its last checkpoint is not what the run was meant to produce.
    """
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    source = Path(source)
    if source.is_file():
        return Artifact(source, kinds[0], sha256_file(source))
    if not source.exists():
        raise BadInputError(f"{source} does not exist", hint="check the path")
    manifest = load_manifest(source)
    status = manifest.get("status")
    if status is not None and status != "completed" and not allow_incomplete:
        raise BadInputError(f"{source}: its run is {status!r}, not completed",
                            hint="finish it (--resume), or pass --set allow_incomplete=true to use it anyway")
    for kind in kinds:
        matches = [r for r in manifest["outputs"] if isinstance(r, dict) and r.get("kind") == kind]
        if not matches:
            continue
        record = matches[-1]
        if not isinstance(record.get("path"), str) or not isinstance(record.get("sha256"), str):
            raise BadInputError(f"{source / MANIFEST}: its {kind} output entry has no path or no sha256",
                                hint="the manifest was edited or is damaged; re-run the stage that made it")
        path = Path(record["path"])
        path = path if path.is_absolute() else source / path
        if not path.is_file():
            raise BadInputError(f"{source}: artifact {record['path']} ({kind}) is missing",
                                hint="re-run the stage that made it")
        digest = sha256_file(path)
        if verify and digest != record["sha256"]:
            raise BadInputError(f"{path}: sha256 mismatch with {source / MANIFEST}",
                                hint="the file was changed after the run; re-run the stage or pass the file directly")
        return Artifact(path, kind, digest, source)
    available = sorted({str(r.get("kind", "?")) for r in manifest["outputs"] if isinstance(r, dict)})
    raise BadInputError(f"{source} has no artifact of kind {' or '.join(kinds)}",
                        hint=f"it has: {', '.join(available) or 'nothing'}")


def verify_recorded_inputs(manifest: dict[str, Any], kinds: Iterable[str], where: str) -> None:
    """Each input of `kinds` recorded with a sha256 must still be there with the same bytes: a run
    that continues (or a check that relies on it) with another teacher or data than it started with
    would mix two of them without a word."""
    kinds = set(kinds)
    for record in manifest.get("inputs") or []:
        if not isinstance(record, dict) or record.get("kind") not in kinds or not record.get("sha256"):
            continue
        path = Path(str(record.get("path", "")))
        if not path.is_file():
            raise BadInputError(f"{where}: its {record['kind']} input {path} is missing",
                                hint="restore it, or start a new run")
        if sha256_file(path) != record["sha256"]:
            raise BadInputError(f"{where}: its {record['kind']} input {path} changed since the run used it "
                                "(sha256 mismatch)", hint="restore the original file, or start a new run")


def newest_run(root: str | os.PathLike, stage: str, *, completed: bool = True) -> Path | None:
    """The most recently started run of `stage` under `root` (optionally only completed ones)."""
    parent = Path(root) / stage
    if not parent.is_dir():
        return None
    best: tuple[str, Path] | None = None
    for child in parent.iterdir():
        try:
            manifest = load_manifest(child)
        except BadInputError:
            continue
        if completed and manifest.get("status") != "completed":
            continue
        key = (manifest.get("finished") or manifest.get("started") or "", child.stat().st_mtime)
        if best is None or key > best[0]:
            best = (key, child)
    return best[1] if best else None


@dataclass
class RunOptions:
    """Where a stage writes: `project/<stage>/<name>` or exactly `run_dir`; with `resume`, the
    training run (run dir or weights/last.pt) it continues instead of starting a new one."""

    project: str = "runs"
    name: str | None = None
    run_dir: str | None = None
    exist_ok: bool = False
    resume: str | None = None

    def create(self, stage: str, config: dict[str, Any] | None = None) -> RunDir:
        return RunDir.create(stage, root=self.project, name=self.name, run_dir=self.run_dir,
                             exist_ok=self.exist_ok, config=config)
