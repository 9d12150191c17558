"""Embeddings for evaluation, from images or from a feature store (`shrink embed`).

Wherever verify takes a labelled set of probe or distractor images it also takes a store folder;
the store must hold the embeddings of the very model being measured (same sha256) with the same
crop and flip, else the result would silently describe another model.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from shrinkcli.errors import BadInputError


class StoreMismatchError(BadInputError):
    """A store embedded by another model or with other preprocessing (exit 2)."""


def _open_store(spec: str, runner: Any, *, crop: int | None, flip: bool, role: str):
    from shrinkcli.evaluate.store import FeatureStore

    store = FeatureStore(spec)
    try:
        store.check_model(runner, crop=crop, flip=flip, what=role)
    except BadInputError as exc:
        raise StoreMismatchError(exc.message, hint=exc.hint) from None
    return store


def labelled_embeddings(spec: str, runner: Any, *, crop: int | None, batch_size: int = 64, flip: bool = True,
                        role: str = "model") -> tuple[np.ndarray, np.ndarray]:
    """(float32 embeddings, labels) of every image of `spec`, or of the store at `spec`."""
    from shrinkcli.evaluate.store import is_store

    if is_store(spec):
        store = _open_store(spec, runner, crop=crop, flip=flip, role=role)
        return store.array(), store.labels()
    from shrinkcli.evaluate.images import embedded_chunks, open_labelled

    dataset = open_labelled(spec, input_size=runner.input_size, crop=crop)
    chunks = list(embedded_chunks(runner, dataset, batch_size=batch_size, flip=flip))
    return np.concatenate(chunks), np.asarray(dataset.labels)


def distractor_rows(spec: str, runner: Any, *, crop: int | None, probes: int, batch_size: int = 64,
                    flip: bool = True, role: str = "model") -> Iterable[np.ndarray]:
    """Distractor embeddings in bounded blocks: read from a store, or embedded 1024 images at a time."""
    from shrinkcli.evaluate.store import is_store

    if is_store(spec):
        store = _open_store(spec, runner, crop=crop, flip=flip, role=role)
        return store.blocks(store.block_rows_for(probes))
    from shrinkcli.evaluate.images import embedded_chunks, open_labelled

    dataset = open_labelled(spec, input_size=runner.input_size, crop=crop)
    return embedded_chunks(runner, dataset, batch_size=batch_size, flip=flip)


def store_record(spec: str, kind: str) -> dict[str, Any] | None:
    """A run-manifest input record for a store (its manifest, not its gigabytes, identifies it)."""
    from pathlib import Path

    from shrinkcli.atomic import sha256_file
    from shrinkcli.evaluate.store import MANIFEST, is_store

    if not is_store(spec):
        return None
    manifest = Path(spec) / MANIFEST
    return {"path": str(manifest.resolve()), "kind": kind, "sha256": sha256_file(manifest)}
