"""Feature store: the embeddings of a whole data set, written once and read in bounded blocks.

Layout of a store folder:
- `store.json`: the manifest (strict JSON, written temp+rename): the model's sha256, the data
  spec, the preprocessing, count, dim, dtype, chunk size and the indices of the complete chunks;
- `features.npy`: a [count, dim] float16/float32 `.npy` file written in place through a memmap;
- `labels.npy`: the [count] int64 identity labels of the data set.

A chunk is listed as complete only after its rows were flushed to `features.npy`, so a process
killed at any point leaves a store whose complete chunks are right; a re-run computes the rest.
Readers take rows with plain file reads (no memmap), so the page cache of a large store never
counts toward the reader's resident memory.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from shrinkcli.atomic import atomic_open, atomic_write_text
from shrinkcli.errors import BadInputError

SCHEMA = 1
MANIFEST = "store.json"
FEATURES = "features.npy"
LABELS = "labels.npy"
DTYPES = {"float16": np.float16, "float32": np.float32}
# what must be equal for a re-run to continue a store instead of starting it again
IDENTITY_KEYS = ("model_sha256", "data", "preprocess", "count", "dtype", "chunk_size")
BLOCK_ELEMENTS = 1 << 25    # probes x block similarities per block: 128 MiB of float32 at most


def is_store(spec: str | None) -> bool:
    return bool(spec) and (Path(str(spec)) / MANIFEST).is_file()


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    try:
        text = json.dumps(manifest, indent=2, allow_nan=False)
    except ValueError as exc:   # a NaN would make the manifest unreadable by strict parsers
        raise BadInputError(f"feature store manifest for {path} holds a non-finite number: {exc}") from exc
    atomic_write_text(path / MANIFEST, text + "\n")


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"),
                              parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"non-finite {c}")))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path / MANIFEST} is not a readable feature store manifest: {exc}",
                            hint="re-create the store with `shrink embed ... --overwrite`") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise BadInputError(f"{path / MANIFEST}: unknown feature store schema {manifest.get('schema') if isinstance(manifest, dict) else '?'}",
                            hint=f"this version reads schema {SCHEMA}; re-create the store with `shrink embed`")
    return manifest


def _npy_header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, offset of the first row) of a .npy file."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(handle)
        return tuple(shape), bool(fortran), np.dtype(dtype), handle.tell()


def _chunks(count: int, chunk_size: int) -> int:
    return max(1, math.ceil(count / chunk_size)) if count else 0


class FeatureStore:
    """A store opened for reading: `labels`, `blocks()` of float32 rows, `array()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_store(self.path):
            raise BadInputError(f"{self.path} is not a feature store (no {MANIFEST})",
                                hint="make one with `shrink embed MODEL --data SPEC --out STORE`")
        self.manifest = _read_manifest(self.path)
        done, total = len(self.manifest.get("chunks_done", [])), _chunks(self.count, self.chunk_size)
        if not self.manifest.get("complete") or done != total:
            raise BadInputError(f"feature store {self.path} is incomplete ({done}/{total} chunks)",
                                hint="re-run the same `shrink embed` command to finish it")
        self._offset = self._header_offset()

    count = property(lambda self: int(self.manifest["count"]))
    dim = property(lambda self: int(self.manifest["dim"]))
    chunk_size = property(lambda self: int(self.manifest["chunk_size"]))
    dtype = property(lambda self: DTYPES[self.manifest["dtype"]])
    model_sha256 = property(lambda self: self.manifest["model_sha256"])
    preprocess = property(lambda self: dict(self.manifest["preprocess"]))

    def _header_offset(self) -> int:
        try:
            shape, fortran, dtype, offset = _npy_header(self.path / FEATURES)
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{self.path / FEATURES} is not a readable .npy file: {exc}") from exc
        if tuple(shape) != (self.count, self.dim) or fortran or np.dtype(dtype) != np.dtype(self.dtype):
            raise BadInputError(f"{self.path / FEATURES} is {shape} {dtype}, the manifest says "
                                f"({self.count}, {self.dim}) {self.manifest['dtype']}",
                                hint="re-create the store with `shrink embed ... --overwrite`")
        return offset

    def labels(self) -> np.ndarray:
        try:
            labels = np.load(self.path / LABELS, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{self.path / LABELS} is not readable: {exc}") from exc
        if labels.shape != (self.count,):
            raise BadInputError(f"{self.path / LABELS} has {labels.shape} labels for {self.count} rows")
        return labels.astype(np.int64, copy=False)

    def blocks(self, rows: int = 8192) -> Iterator[np.ndarray]:
        """float32 [<= rows, dim] blocks in order; only one block is in memory at a time."""
        rows = max(1, int(rows))
        row_bytes = self.dim * np.dtype(self.dtype).itemsize
        with open(self.path / FEATURES, "rb") as handle:
            for start in range(0, self.count, rows):
                n = min(rows, self.count - start)
                handle.seek(self._offset + start * row_bytes)
                block = np.fromfile(handle, dtype=self.dtype, count=n * self.dim)
                if block.size != n * self.dim:
                    raise BadInputError(f"{self.path / FEATURES} is truncated at row {start}")
                yield block.reshape(n, self.dim).astype(np.float32)

    def block_rows_for(self, probes: int) -> int:
        """Rows per block so that a block's probe similarities stay near 128 MiB."""
        return int(min(16384, max(256, BLOCK_ELEMENTS // max(1, probes))))

    def array(self) -> np.ndarray:
        """All rows as float32 (for a probe set; a distractor store is read with `blocks`)."""
        if self.count == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(list(self.blocks()))

    def check_model(self, runner: Any, *, crop: int | None, flip: bool, what: str = "model") -> None:
        """BadInputError unless the store holds `runner`'s embeddings with this preprocessing."""
        if runner.sha256 != self.model_sha256:
            raise BadInputError(f"feature store {self.path} was embedded with another model "
                                f"(sha256 {self.model_sha256[:12]}, the {what} {runner.path.name} is {runner.sha256[:12]})",
                                hint=f"embed it with this {what}: shrink embed {runner.path} --data "
                                     f"{self.manifest['data']} --out NEW_STORE")
        wanted = preprocess_of(runner, crop=crop, flip=flip)
        if wanted != self.preprocess:
            diff = ", ".join(f"{k} {self.preprocess.get(k)!r} vs {v!r}" for k, v in wanted.items()
                             if self.preprocess.get(k) != v)
            raise BadInputError(f"feature store {self.path} was embedded with other preprocessing ({diff})",
                                hint="use the store's crop/flip or re-embed")

    def describe(self) -> dict[str, Any]:
        return {"store": str(self.path), "data": self.manifest["data"], "count": self.count, "dim": self.dim,
                "dtype": self.manifest["dtype"], "model_sha256": self.model_sha256}


def preprocess_of(runner: Any, *, crop: int | None, flip: bool) -> dict[str, Any]:
    return {"input_size": int(runner.input_size), "crop": crop, "mean": float(runner.mean),
            "std": float(runner.std), "flip": bool(flip)}


class StoreWriter:
    """Create a store or continue one: `pending()` chunk indices, `write(chunk, rows)`, `finish()`."""

    def __init__(self, path: str | Path, identity: dict[str, Any], labels: np.ndarray, *,
                 extra: dict[str, Any] | None = None, overwrite: bool = False):
        self.path = Path(path)
        self.identity = {k: identity[k] for k in IDENTITY_KEYS}
        if self.identity["dtype"] not in DTYPES:
            raise BadInputError(f"store dtype must be one of {', '.join(DTYPES)}, got {self.identity['dtype']!r}")
        if int(self.identity["chunk_size"]) <= 0:
            raise BadInputError(f"chunk_size must be > 0, got {self.identity['chunk_size']}")
        self.count, self.chunk_size = int(identity["count"]), int(identity["chunk_size"])
        if self.count <= 0:
            raise BadInputError("a feature store needs at least one row")
        if len(labels) != self.count:
            raise BadInputError(f"{len(labels)} labels for {self.count} rows")
        self.dim: int | None = None
        self._offset = 0
        self.resumed = self._resume(overwrite, labels)
        if self.resumed is None:
            self._create(labels, extra or {})

    @property
    def total(self) -> int:
        return _chunks(self.count, self.chunk_size)

    def rows(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_size, min(self.count, (chunk + 1) * self.chunk_size)

    def _resume(self, overwrite: bool, labels: np.ndarray) -> int | None:
        """Chunks already complete when this is the same store, None to start a new one."""
        if self.path.exists() and not self.path.is_dir():
            raise BadInputError(f"store path {self.path} is a file", hint="--out must be a folder")
        if not is_store(self.path):
            # a run killed before its first manifest leaves only our own files: start afresh
            foreign = [p for p in self.path.iterdir() if p.name not in (FEATURES, LABELS)
                       and not (p.name.startswith(".") and p.name.endswith(".tmp"))] if self.path.is_dir() else []
            if foreign:
                raise BadInputError(f"{self.path} is not empty and not a feature store",
                                    hint="choose a new or empty --out folder")
            return None
        if overwrite:
            return None
        self.manifest = _read_manifest(self.path)
        differ = [k for k in IDENTITY_KEYS if self.manifest.get(k) != self.identity[k]]
        if differ:
            detail = "; ".join(f"{k}: store {_short(self.manifest.get(k))} vs now {_short(self.identity[k])}" for k in differ)
            raise BadInputError(f"feature store {self.path} holds other embeddings ({detail})",
                                hint="pass --overwrite to replace it, or choose another --out")
        if self.manifest.get("dim") is not None and not self._open_features(self.manifest["dim"]):
            self.manifest.update(dim=None, chunks_done=[], complete=False)   # features file lost: start over
        if not (self.path / LABELS).is_file():
            self._write_labels(labels)
        return len(self.manifest.get("chunks_done", []))

    def _write_labels(self, labels: np.ndarray) -> None:
        with atomic_open(self.path / LABELS, "wb") as handle:
            np.save(handle, np.asarray(labels, dtype=np.int64), allow_pickle=False)

    def _create(self, labels: np.ndarray, extra: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for name in (FEATURES, LABELS):
            (self.path / name).unlink(missing_ok=True)
        self._write_labels(labels)
        self.manifest = {"schema": SCHEMA, **self.identity, **extra, "dim": None, "chunks_done": [],
                         "complete": False, "started": _now(), "finished": None}
        _write_manifest(self.path, self.manifest)

    def _open_features(self, dim: int) -> bool:
        try:
            shape, fortran, dtype, offset = _npy_header(self.path / FEATURES)
        except (OSError, ValueError):
            return False
        if shape != (self.count, dim) or fortran or dtype != np.dtype(DTYPES[self.identity["dtype"]]):
            return False
        self.dim, self._offset = int(dim), offset
        return True

    def pending(self) -> list[int]:
        done = set(self.manifest.get("chunks_done", []))
        return [c for c in range(self.total) if c not in done]

    def _allocate(self, dim: int) -> None:
        # allocated under a temp name and renamed, so a kill during allocation leaves no half header
        tmp = self.path / f".{FEATURES}.tmp"
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPES[self.identity["dtype"]],
                                          shape=(self.count, dim))
        array.flush()
        del array
        tmp.replace(self.path / FEATURES)
        self.manifest["dim"] = int(dim)
        _write_manifest(self.path, self.manifest)
        self._open_features(dim)

    def write(self, chunk: int, rows: np.ndarray) -> None:
        start, stop = self.rows(chunk)
        rows = np.asarray(rows)
        if rows.ndim != 2 or len(rows) != stop - start:
            raise BadInputError(f"chunk {chunk}: expected {stop - start} rows, got shape {rows.shape}")
        if not np.isfinite(rows).all():
            raise BadInputError(f"the model gave non-finite embeddings for rows {start}..{stop - 1}",
                                hint="check the model with `shrink verify`")
        if self.dim is None:
            self._allocate(rows.shape[1])
        if rows.shape[1] != self.dim:
            raise BadInputError(f"chunk {chunk}: {rows.shape[1]}-d rows for a {self.dim}-d store")
        # a map of this chunk's rows only: written pages leave the process with it, so the
        # writer's resident memory does not grow with the store
        dtype = np.dtype(DTYPES[self.identity["dtype"]])
        target = np.memmap(self.path / FEATURES, dtype=dtype, mode="r+", shape=(stop - start, self.dim),
                           offset=self._offset + start * self.dim * dtype.itemsize)
        target[:] = rows
        target.flush()      # rows on disk before the manifest says the chunk is done
        del target
        self.manifest["chunks_done"] = sorted({*self.manifest["chunks_done"], int(chunk)})
        _write_manifest(self.path, self.manifest)

    def finish(self) -> dict[str, Any]:
        if self.pending():
            raise BadInputError(f"feature store {self.path}: {len(self.pending())} chunks still missing")
        self.manifest.update(complete=True, finished=_now())
        _write_manifest(self.path, self.manifest)
        return self.manifest


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
    return text[:12] if isinstance(value, str) and len(value) == 64 else text


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
