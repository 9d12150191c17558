"""ONNX export of every registered student and a small teacher: fp32 parity with torch."""

from __future__ import annotations

import pytest
import torch

from _helpers import calibrated_model
from shrinkcli.evaluate.images import generated_pixels
from shrinkcli.export.check import parity_check, torch_embeddings
from shrinkcli.export.onnx_export import GraphSpec, export_onnx
from shrinkcli.models.registry import list_models

SIZE = 32




@pytest.mark.parametrize("name", list_models("student"))
def test_every_student_matches_torch(name, tmp_path):
    model = calibrated_model(name, input_size=SIZE, width=0.25)
    spec = GraphSpec(input_size=SIZE)
    path = export_onnx(model, tmp_path / "m.onnx", spec)
    pixels = generated_pixels(8, SIZE)
    result = parity_check(model, path, spec, pixels, variant="fp32")
    assert result["min_cosine"] >= 0.99999, result
    assert result["passed"]
    # The comparison means something only if different images give different embeddings.
    embeddings = torch.nn.functional.normalize(torch.from_numpy(torch_embeddings(model, spec, pixels)), dim=1)
    assert (embeddings @ embeddings.T).triu(1).max() < 0.9


def test_small_teacher_matches_torch(tmp_path):
    model = calibrated_model("r18", input_size=SIZE, width=0.25)
    spec = GraphSpec(input_size=SIZE)
    path = export_onnx(model, tmp_path / "r18.onnx", spec)
    result = parity_check(model, path, spec, generated_pixels(8, SIZE), variant="fp32")
    assert result["min_cosine"] >= 0.99999, result


def test_mobilefacenet_at_112_in_channels_last_matches_torch(tmp_path):
    model = calibrated_model("mobilefacenet", input_size=112).to(memory_format=torch.channels_last)
    spec = GraphSpec(input_size=112)
    path = export_onnx(model, tmp_path / "mfn112.onnx", spec)
    result = parity_check(model, path, spec, generated_pixels(4, 112), variant="fp32")
    assert result["min_cosine"] >= 0.99999, result
    # Exporting a copy must leave the caller's model as it was.
    assert model.training is False
