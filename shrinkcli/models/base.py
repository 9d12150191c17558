"""What every architecture shares: the `FaceOutput` of `forward_features` and the table that
`@register_model` fills. Family modules import this; `shrinkcli.models.registry` imports them."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn


class FaceOutput(NamedTuple):
    stage_maps: list[torch.Tensor]
    embedding: torch.Tensor


_REGISTRY: dict[str, tuple[Callable[..., nn.Module], str]] = {}


def register_model(name: str, family: str) -> Callable:
    """Decorator: `@register_model("r50", "teacher")` on a factory `fn(**kwargs) -> nn.Module`."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = (fn, family)
        return fn

    return wrap
