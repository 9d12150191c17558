"""Parity of an exported graph against the fp32 torch model it came from.

Both sides see the same uint8 images: torch gets (x - mean) / std as in training, the graph gets
whatever its input format is (uint8 when preprocessing is inside it). Per image we compare the
embeddings by cosine similarity; the gate is on the *minimum* cosine, because one bad image is a
bad deployment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shrinkcli.errors import BadInputError
from shrinkcli.export.onnx_export import INPUT_NAME, GraphSpec

# Minimum per-image cosine similarity (torch fp32 vs the exported graph) per variant.
DEFAULT_MIN_COSINE = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.98}


def generated_pixels(count: int, input_size: int, seed: int = 0) -> np.ndarray:
    """Seeded smooth colour images (uint8 NCHW), used when no real images are given.

    Low-frequency patterns plus mild noise exercise the network more like photos do than white noise.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 8, 8, generator=generator) * 255
    images = torch.nn.functional.interpolate(coarse, size=(input_size, input_size), mode="bilinear",
                                             align_corners=False)
    images = images + torch.randn(images.shape, generator=generator) * 12
    return images.clamp(0, 255).round().to(torch.uint8).numpy()


def load_pixels(data_spec: str, count: int, *, input_size: int, crop: int | None = None) -> np.ndarray:
    """`count` images (evenly spread over the dataset) from a data spec, as uint8 RGB NCHW."""
    from shrinkcli.data import open_dataset

    # mean 0 / std 1 makes the dataset return raw pixel values, which we normalise ourselves.
    dataset = open_dataset(data_spec, input_size=input_size, crop=crop, mean=0.0, std=1.0, skip_corrupt=True)
    if len(dataset) == 0:
        raise BadInputError(f"{data_spec} has no images", hint="pass a data spec with at least one readable image")
    indices = np.unique(np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).round().astype(int))
    images = [dataset[int(i)][0] for i in indices]
    stacked = torch.stack([torch.as_tensor(img) for img in images]).float()
    return stacked.clamp(0, 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def torch_embeddings(model, spec: GraphSpec, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    model = model.float().eval()
    outputs = []
    for start in range(0, len(pixels), batch_size):
        batch = torch.from_numpy(pixels[start:start + batch_size]).float()
        embedding = model((batch - spec.mean) / spec.std)
        if spec.normalize_output:
            embedding = torch.nn.functional.normalize(embedding, dim=1)
        outputs.append(embedding.float().numpy())
    return np.concatenate(outputs)


def onnx_session(path: str | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_embeddings(path_or_session, spec: GraphSpec, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    session = onnx_session(path_or_session) if isinstance(path_or_session, (str, Path)) else path_or_session
    outputs = []
    for start in range(0, len(pixels), batch_size):
        feed = {INPUT_NAME: spec.graph_input(pixels[start:start + batch_size])}
        outputs.append(np.asarray(session.run(None, feed)[0], dtype=np.float32))
    return np.concatenate(outputs)


def compare_embeddings(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    reference = reference.astype(np.float64)
    candidate = candidate.astype(np.float64)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    cosine = (reference * candidate).sum(axis=1) / np.maximum(norms, 1e-12)
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "max_abs_diff": float(np.abs(reference - candidate).max()), "images": int(len(cosine)),
            "finite": bool(np.isfinite(candidate).all())}


def parity_check(model, onnx_path: str | Path, spec: GraphSpec, pixels: np.ndarray, *, variant: str,
                 min_cosine: float | None = None, reference: np.ndarray | None = None) -> dict:
    """Compare the graph at `onnx_path` with `model`; `passed` is min cosine >= the variant's threshold."""
    threshold = DEFAULT_MIN_COSINE[variant] if min_cosine is None else float(min_cosine)
    if reference is None:
        reference = torch_embeddings(model, spec, pixels)
    result = compare_embeddings(reference, onnx_embeddings(onnx_path, spec, pixels))
    result["min_cosine_required"] = threshold
    result["passed"] = bool(result["finite"] and result["cosine_min"] >= threshold)
    return result
