"""One registry for every architecture: `create_model(name, **kwargs)`, `list_models()`.

Every model is an `nn.Module` with:
- `forward_features(x) -> FaceOutput(stage_maps=[s1, s2, s3, s4], embedding)`: the four stage outputs
  (strides 2/4/8/16 of the input, i.e. 56/28/14/7 at 112x112) and the final embedding;
- `forward(x) -> embedding` (unnormalised);
- attributes `arch` (registry name), `arch_kwargs` (what `create_model` needs to rebuild it),
  `embedding_size`, `input_size`, `stage_channels` (4 ints).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from shrinkcli.errors import BadInputError
from shrinkcli.models import iresnet, mfnr, mobilefacenet, mobilenet  # noqa: F401  (their @register_model fill the table)
from shrinkcli.models.base import _REGISTRY, FaceOutput, register_model

__all__ = ["FaceOutput", "create_model", "list_models", "model_family", "register_model"]


def list_models(family: str | None = None) -> list[str]:
    return sorted(n for n, (_, fam) in _REGISTRY.items() if family is None or fam == family)


def model_family(name: str) -> str:
    if name not in _REGISTRY:
        raise BadInputError(f"unknown architecture {name!r}", hint=f"choose one of: {', '.join(list_models())}")
    return _REGISTRY[name][1]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    model_family(name)
    fn, _ = _REGISTRY[name]
    try:
        model = fn(**kwargs)
    except TypeError as exc:
        raise BadInputError(f"architecture {name!r} does not accept {sorted(kwargs)}: {exc}") from exc
    model.arch = name
    model.arch_kwargs = dict(kwargs)
    return model
