"""ONNX export of every registered student and a small teacher: fp32 parity with torch."""

from __future__ import annotations

import pytest
import torch

from shrinkcli.export.check import generated_pixels, parity_check
from shrinkcli.export.onnx_export import GraphSpec, export_onnx
from shrinkcli.models.registry import create_model, list_models

SIZE = 32


def _randomise_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh BN layers are identities; random statistics make parity tests see real arithmetic."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model.eval()


def _model(name: str, **kwargs) -> torch.nn.Module:
    return _randomise_batchnorm(create_model(name, **kwargs))


@pytest.mark.parametrize("name", list_models("student"))
def test_every_student_matches_torch(name, tmp_path):
    model = _model(name, input_size=SIZE, width=0.25)
    spec = GraphSpec(input_size=SIZE)
    path = export_onnx(model, tmp_path / "m.onnx", spec)
    result = parity_check(model, path, spec, generated_pixels(8, SIZE), variant="fp32")
    assert result["cosine_min"] >= 0.99999, result
    assert result["passed"]


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
