"""Helpers shared by several test files (imported as `from _helpers import ...`)."""

from __future__ import annotations

import torch

from pathlib import Path

from shrinkcli.evaluate.images import generated_pixels
from shrinkcli.models.registry import create_model


def calibrate_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Set BN statistics from real activations, as training would.

    A freshly initialised network maps every image to nearly the same embedding, which would make
    any cosine comparison pass; with calibrated statistics embeddings differ across images.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    pixels = torch.from_numpy(generated_pixels(16, model.input_size, seed=99)).float()
    model.train()
    with torch.no_grad():
        model((pixels - 127.5) / 127.5)
    return model.eval()


def calibrated_model(name: str, **kwargs) -> torch.nn.Module:
    return calibrate_batchnorm(create_model(name, **kwargs))


PREPROCESS = {"mean": 127.5, "std": 127.5, "crop": None, "channel_order": "RGB"}


def tiny_teacher_file(directory: Path, *, size: int = 32, seed: int = 1) -> Path:
    """An untrained r18 (width 0.125, 32-d) saved as safetensors with its preprocessing, no classifier."""
    from shrinkcli.models.io import save_model_safetensors

    torch.manual_seed(seed)
    teacher = create_model("r18", embedding_size=32, input_size=size, width=0.125)
    return save_model_safetensors(teacher, directory / "teacher.safetensors", {**PREPROCESS, "input_size": size})


def tiny_student_files(directory: Path, *, size: int = 32, seed: int = 0) -> dict[str, Path]:
    """An untrained MobileFaceNet (width 0.25, 32-d) as safetensors and as its fp32 ONNX export."""
    from shrinkcli.export.onnx_export import GraphSpec, export_onnx
    from shrinkcli.models.io import save_model_safetensors

    torch.manual_seed(seed)
    model = create_model("mobilefacenet", embedding_size=32, input_size=size, width=0.25).eval()
    weights = save_model_safetensors(model, directory / "model.safetensors", preprocess={**PREPROCESS, "input_size": size})
    graph = directory / "model.onnx"
    export_onnx(model, graph, GraphSpec(input_size=size), exporter="torchscript")
    return {"weights": weights, "onnx": graph}
