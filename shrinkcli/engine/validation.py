"""Periodic verification during training: embed the pairs' images, k-fold accuracy.

Uses the project's evaluation module (`shrinkcli.evaluate`) when it is available; the small
fallback here follows the same insightface protocol (flip-sum embeddings, L2-normalised, squared
L2 distance, thresholds 0..4 step 0.01 chosen on k-1 folds and applied to the held-out fold).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch


def _embed_fallback(fn: Callable, images: torch.Tensor, *, mean: float, std: float, batch_size: int = 64) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
        batch = (images[start:start + batch_size].float() - mean) / std
        emb = fn(batch) + fn(batch.flip(3))
        out.append(torch.nn.functional.normalize(emb.float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def _kfold_fallback(emb: np.ndarray, pairs, nfolds: int = 10) -> dict[str, Any]:
    dist = ((emb[pairs.left] - emb[pairs.right]) ** 2).sum(1)
    issame = np.asarray(pairs.issame, bool)
    folds = getattr(pairs, "folds", None)
    if folds is None:
        folds = np.arange(len(dist)) * nfolds // max(1, len(dist))
    thresholds = np.arange(0, 4, 0.01)
    accs = []
    for fold in np.unique(folds):
        test, train = folds == fold, folds != fold
        if not train.any():
            train = test
        train_acc = [((dist[train] < t) == issame[train]).mean() for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(((dist[test] < best) == issame[test]).mean())
    return {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs))}


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
        try:
            from shrinkcli.evaluate import embed
            from shrinkcli.evaluate.verification import evaluate_pairs
        except ImportError:
            emb = _embed_fallback(fn, pairs.images, mean=mean, std=std, batch_size=batch_size)
            return _kfold_fallback(emb, pairs)
        emb = embed(fn, pairs.images, mean=mean, std=std, batch_size=batch_size, flip=True)
        return evaluate_pairs(emb, pairs)
    finally:
        model.train(was_training)
