"""ONNX export of every registered student and a small teacher: fp32 parity with torch."""

from __future__ import annotations

import pytest
import torch

from shrinkcli.export.check import generated_pixels, parity_check, torch_embeddings
from shrinkcli.export.onnx_export import GraphSpec, export_onnx
from shrinkcli.models.registry import create_model, list_models

SIZE = 32


def _calibrate_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
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


def _model(name: str, **kwargs) -> torch.nn.Module:
    return _calibrate_batchnorm(create_model(name, **kwargs))


@pytest.mark.parametrize("name", list_models("student"))
def test_every_student_matches_torch(name, tmp_path):
    model = _model(name, input_size=SIZE, width=0.25)
    spec = GraphSpec(input_size=SIZE)
    path = export_onnx(model, tmp_path / "m.onnx", spec)
    pixels = generated_pixels(8, SIZE)
    result = parity_check(model, path, spec, pixels, variant="fp32")
    assert result["cosine_min"] >= 0.99999, result
    assert result["passed"]
    # The comparison means something only if different images give different embeddings.
    embeddings = torch.nn.functional.normalize(torch.from_numpy(torch_embeddings(model, spec, pixels)), dim=1)
    assert (embeddings @ embeddings.T).triu(1).max() < 0.9


def test_small_teacher_matches_torch(tmp_path):
    model = _model("r18", input_size=SIZE, width=0.25)
    spec = GraphSpec(input_size=SIZE)
    path = export_onnx(model, tmp_path / "r18.onnx", spec)
    result = parity_check(model, path, spec, generated_pixels(8, SIZE), variant="fp32")
    assert result["cosine_min"] >= 0.99999, result


def test_mobilefacenet_at_112_in_channels_last_matches_torch(tmp_path):
    model = _model("mobilefacenet", input_size=112).to(memory_format=torch.channels_last)
    spec = GraphSpec(input_size=112)
    path = export_onnx(model, tmp_path / "mfn112.onnx", spec)
    result = parity_check(model, path, spec, generated_pixels(4, 112), variant="fp32")
    assert result["cosine_min"] >= 0.99999, result
    # Exporting a copy must leave the caller's model as it was.
    assert model.training is False
