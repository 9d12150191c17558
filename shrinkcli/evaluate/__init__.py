"""Evaluation: embeddings with flip-sum, verification (k-fold), TAR@FAR, identification,
IJB templates, MegaFace distractors, parity and paired bootstrap.

`embed` is the one place images become embeddings for evaluation, so every model (torch or
ONNX, teacher or student) is measured with the same preprocessing and flip rule.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def _to_numpy(out: Any) -> np.ndarray:
    if isinstance(out, np.ndarray):
        return out.astype(np.float32, copy=False)
    return out.detach().float().cpu().numpy()


def embed_pixels(forward_uint8: Callable[[Any], Any], images_uint8: Any, *, batch_size: int = 64,
                 flip: bool = True) -> np.ndarray:
    """Like `embed`, but `forward_uint8` takes the raw uint8 NCHW batch (e.g. an ONNX graph with
    its preprocessing inside): the flip is applied to the pixels."""
    import torch

    images = torch.as_tensor(images_uint8)
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            out = _to_numpy(forward_uint8(batch)).astype(np.float64)
            if flip:
                out = out + _to_numpy(forward_uint8(torch.flip(batch, dims=[3])))
            chunks.append(out)
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    emb = np.concatenate(chunks)
    return (emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def embed(fn: Callable[[Any], Any], images_uint8: Any, *, mean: float = 127.5, std: float = 127.5,
          batch_size: int = 64, flip: bool = True) -> np.ndarray:
    """Embeddings [M, D] (float32, L2-normalised) of uint8 images [M, 3, H, W] (torch or numpy).

    `fn` maps a float32 NCHW batch normalised as (x - mean) / std to embeddings (torch tensor or
    numpy). With `flip` the embedding of the horizontally flipped image is added before the
    normalisation (the insightface protocol).
    """
    return embed_pixels(lambda batch: fn((batch.float() - mean) / std), images_uint8,
                        batch_size=batch_size, flip=flip)


__all__ = ["embed", "embed_pixels"]
