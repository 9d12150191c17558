"""Batches for the training loop: the DataLoader (uint8 when the dataset can, persistent workers)
and the per-step move to the device (normalisation and flips run there)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # Each worker gets its own deterministic stream derived from the loader's generator.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(dataset: Any, sampler: Any, *, workers: int, device: torch.device, seed: int
                 ) -> tuple[torch.utils.data.DataLoader, tuple[torch.Tensor, torch.Tensor] | None]:
    """(loader, (mean, std) on the device when the loader ships uint8 images, else None)."""
    from shrinkcli.data.base import Uint8View

    workers = max(0, workers)
    normalise = None
    if callable(getattr(dataset, "item_uint8", None)):
        # uint8 through the workers' shared memory and the host-to-device copy (a quarter of
        # float32's bytes); the same (x - mean) / std in float32 then runs on the device.
        normalise = (torch.tensor(float(np.float32(dataset.mean)), device=device),
                     torch.tensor(float(np.float32(dataset.std)), device=device))
        dataset = Uint8View(dataset)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", worker_init_fn=_seed_worker if workers else None,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=workers > 0)     # the sampler runs in this process: set_epoch still applies
    return loader, normalise


def device_batch(images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, flips: torch.Tensor | None, *,
                 device: torch.device, normalise: tuple[torch.Tensor, torch.Tensor] | None, channels_last: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images normalised and flipped on the device, labels on the device, flip flags on the host)."""
    flipped = flips[indices] if flips is not None else torch.zeros(len(indices), dtype=torch.bool)
    if device.type == "cuda":
        flipped = flipped.pin_memory()
    images = images.to(device, non_blocking=True)
    if normalise is not None:
        # Division by a tensor, not by a Python number (which CUDA turns into a reciprocal
        # multiply): the same float32 arithmetic, so the same numbers as the dataset's own path.
        images = images.to(torch.float32).sub_(normalise[0]).div_(normalise[1])
    flipped_device = flipped.to(device, non_blocking=True)
    images = torch.where(flipped_device.view(-1, 1, 1, 1), images.flip(3), images)  # on the device: cheaper
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True), flipped
