"""Parity of an exported graph against the fp32 torch model it came from.

Both sides see the same uint8 images: torch gets (x - mean) / std as in training, the graph gets
whatever its input format is (uint8 when preprocessing is inside it). Per image we compare the
embeddings by cosine similarity; the gate is on the *minimum* cosine, because one bad image is a
bad deployment. Comparison, thresholds and images are those of `shrink verify`
(shrinkcli.evaluate.parity, shrinkcli.evaluate.images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shrinkcli.errors import BadInputError
from shrinkcli.evaluate.parity import gate
from shrinkcli.export.onnx_export import INPUT_NAME, GraphSpec

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


def parity_check(model, onnx_path: str | Path, spec: GraphSpec, pixels: np.ndarray, *, variant: str,
                 min_cosine: float | None = None, reference: np.ndarray | None = None) -> dict:
    """Compare the graph at `onnx_path` with `model`; `passed` is min cosine >= the variant's threshold."""
    if reference is None:
        reference = torch_embeddings(model, spec, pixels)
    return gate(reference, onnx_embeddings(onnx_path, spec, pixels), variant, min_cosine)
