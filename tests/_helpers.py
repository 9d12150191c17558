"""Helpers shared by several test files (imported as `from _helpers import ...`)."""

from __future__ import annotations

import torch

from shrinkcli.export.check import generated_pixels
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
