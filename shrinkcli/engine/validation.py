"""Periodic verification during training: embed the pairs' images, k-fold accuracy.

Same protocol as `shrink verify` (flip-summed, L2-normalised embeddings, k-fold accuracy). The
result also carries `embedding_spread`, one minus the squared norm of the mean normalised embedding:
about 1 for a healthy model, near 0 when every image maps to the same direction (for example a
network whose BatchNorm running statistics have not converged yet), which accuracy alone hides.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from shrinkcli.evaluate import embed
from shrinkcli.evaluate.verification import evaluate_pairs


def embedding_spread(embeddings: np.ndarray) -> float:
    """1 - |mean of the L2-normalised rows|^2: 0 when all rows point the same way."""
    rows = np.asarray(embeddings, dtype=np.float64)
    if len(rows) == 0:
        return 0.0
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return float(1.0 - np.sum(rows.mean(0) ** 2))


def verify_pairs(model: torch.nn.Module, pairs, *, mean: float, std: float, device: torch.device,
                 channels_last: bool, autocast_dtype: torch.dtype | None, batch_size: int = 64) -> dict[str, Any]:
    """{"accuracy", "accuracy_std", ...} of `model` on a PairSet; restores the model's train mode."""
    was_training = model.training
    model.eval()

    def fn(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device, non_blocking=True)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None):
            return model(batch).float()

    try:
        emb = embed(fn, pairs.images, mean=mean, std=std, batch_size=batch_size, flip=True)
        result = evaluate_pairs(emb, pairs)
        result["embedding_spread"] = embedding_spread(emb)
        return result
    finally:
        model.train(was_training)


def warn_if_collapsed(result: dict, epoch: int) -> None:
    """A warning when every validation image maps to nearly the same embedding."""
    from shrinkcli import log

    spread = result.get("embedding_spread")
    if spread is not None and spread < 0.01:
        log.warning(f"epoch {epoch}: validation embeddings are nearly identical for every image "
                    f"(spread {spread:.2g}): the model's BatchNorm running statistics have not converged "
                    "or it collapsed; train more steps (a smaller batch_size or more epochs)")
