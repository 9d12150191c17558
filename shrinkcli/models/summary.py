"""Parameter and multiply-accumulate counts, measured on the real module graph.

MACs come from forward hooks on every Conv2d and Linear (BN, PReLU and additions are not
counted, the usual convention of the MobileFaceNet and MobileNet papers). Models are built and
run on PyTorch's meta device: shapes propagate but no memory is allocated and no arithmetic is
done, so even r200 is summarised in well under a second.
"""

from __future__ import annotations

import torch
from torch import nn

from shrinkcli.models.registry import create_model, list_models, model_family


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kernel = module.kernel_size[0] * module.kernel_size[1]
        return output.numel() * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def count_macs(model: nn.Module, input_size: int) -> int:
    """Multiply-accumulates of one forward pass on a single `input_size` square RGB image."""
    total = [0]

    def hook(module: nn.Module, _inputs, output) -> None:
        total[0] += _layer_macs(module, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total[0]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model(name: str, input_size: int = 112, **kwargs) -> dict:
    """One table row for architecture `name`: params and MACs in millions, stage shapes."""
    with torch.device("meta"):
        model = create_model(name, input_size=input_size, **kwargs)
        model.eval()
        with torch.no_grad():
            out = model.forward_features(torch.zeros(1, 3, input_size, input_size))
    stages = " ".join(f"{s.shape[1]}@{s.shape[2]}" for s in out.stage_maps)
    return {
        "name": name,
        "family": model_family(name),
        "params (M)": round(count_params(model) / 1e6, 3),
        "MACs (M)": round(count_macs(model, input_size) / 1e6, 1),
        "stages": stages,
        "embedding": model.embedding_size,
    }


def registry_table(input_size: int = 112, name_filter: str | None = None) -> list[dict]:
    """Rows for `shrink models`: teachers then students, each sorted by size."""
    names = [n for n in list_models() if not name_filter or name_filter.lower() in n.lower()]
    rows = [describe_model(n, input_size=input_size) for n in names]
    return sorted(rows, key=lambda r: (r["family"] != "teacher", r["params (M)"]))
