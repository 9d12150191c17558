"""The final teacher-vs-student verification table of a distill run."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _embed_fn(model: nn.Module, device: torch.device, channels_last: bool):
    def fn(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return model(batch).float()

    return fn


def verification_row(name: str, model: nn.Module, pairs: Any, *, mean: float, std: float, device: torch.device,
                     channels_last: bool, nfolds: int = 10) -> dict[str, Any]:
    """One table row: accuracy (+- std over folds) and TAR at the smallest FAR the pairs allow."""
    from shrinkcli.evaluate import embed
    from shrinkcli.evaluate.verification import evaluate_pairs

    was_training = model.training
    model.eval()
    try:
        emb = embed(_embed_fn(model, device, channels_last), pairs.images, mean=mean, std=std, flip=True)
    finally:
        model.train(was_training)
    result = evaluate_pairs(emb, pairs, nfolds=nfolds)
    tar = result.get("tar_at_far") or {}
    far_key = min(tar, key=float) if tar else None
    return {
        "model": name,
        "arch": getattr(model, "arch", "?"),
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "accuracy": round(result["accuracy"], 4),
        "accuracy_std": round(result["accuracy_std"], 4),
        "tar_at_far": f"{tar[far_key]:.4f} @ {far_key}" if far_key else "n/a (too few pairs)",
        "pairs": result.get("pairs", len(pairs.issame)),
    }


def teacher_student_table(teacher: nn.Module, student: nn.Module, pairs: Any, *, mean: float, std: float,
                          device: torch.device, channels_last: bool, nfolds: int = 10) -> list[dict[str, Any]]:
    """Rows for the teacher and the student on the same pairs, plus the student's gap to the teacher."""
    options = dict(mean=mean, std=std, device=device, channels_last=channels_last, nfolds=nfolds)
    rows = [verification_row("teacher", teacher, pairs, **options), verification_row("student", student, pairs, **options)]
    rows[0]["gap"] = 0.0
    rows[1]["gap"] = round(rows[0]["accuracy"] - rows[1]["accuracy"], 4)
    return rows
