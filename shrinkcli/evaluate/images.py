"""Pixels for evaluation: parity images and labelled sets embedded in bounded chunks."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np

from shrinkcli.errors import BadInputError


def dataset_pixels(dataset: Any, indices: np.ndarray) -> np.ndarray:
    """uint8 RGB NCHW images of `dataset` at `indices` (decoded in threads: PIL releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(lambda i: dataset.load_uint8(int(i)), indices)))


def open_labelled(spec: str, *, input_size: int, crop: int | None):
    from shrinkcli.data import open_dataset

    # strict: substituting another image for a corrupt one would silently change what is measured
    dataset = open_dataset(spec, input_size=input_size, crop=crop, skip_corrupt=False)
    if len(dataset) == 0:
        raise BadInputError(f"{spec} has no images", hint="pass a data spec with readable images")
    return dataset


def parity_pixels(spec: str | None, count: int, *, input_size: int, crop: int | None, seed: int = 0):
    """(`count` images spread evenly over `spec`, or seeded generated images; where they came from)."""
    if count <= 0:
        raise BadInputError(f"parity_images must be > 0, got {count}")
    if spec:
        dataset = open_labelled(spec, input_size=input_size, crop=crop)
        indices = np.unique(np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).round().astype(int))
        return dataset_pixels(dataset, indices), spec
    return generated_pixels(count, input_size, seed), "generated"


def generated_pixels(count: int, input_size: int, seed: int = 0) -> np.ndarray:
    """Seeded smooth colour images with mild noise: closer to photos than white noise.

    Image i depends only on (seed, i): the 32 images of an export check are the first 32 of a
    verify's 64 with the same seed."""
    scale = input_size / 8
    grid = (np.arange(input_size) + 0.5) / scale - 0.5
    lo = np.clip(np.floor(grid).astype(int), 0, 7)
    hi = np.clip(lo + 1, 0, 7)
    w = np.clip(grid - lo, 0, 1)
    images = np.empty((count, 3, input_size, input_size), dtype=np.uint8)
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        coarse = rng.uniform(0, 255, (3, 8, 8))
        rows = coarse[:, lo, :] * (1 - w)[:, None] + coarse[:, hi, :] * w[:, None]
        image = rows[:, :, lo] * (1 - w) + rows[:, :, hi] * w + rng.normal(0, 12, (3, input_size, input_size))
        images[index] = np.clip(np.round(image), 0, 255)
    return images


def embedded_chunks(runner: Any, dataset: Any, *, chunk: int = 1024, batch_size: int = 64,
                    flip: bool = True) -> Iterator[np.ndarray]:
    """Embeddings of every image of `dataset`, `chunk` images at a time (memory stays bounded)."""
    for start in range(0, len(dataset), chunk):
        indices = np.arange(start, min(start + chunk, len(dataset)))
        yield runner.embed(dataset_pixels(dataset, indices), batch_size=batch_size, flip=flip)
