"""Frozen-teacher preparation: the teacher as inference needs it, prepared once per run.

A teacher in distillation, cache building and verification never trains, so three things that a
trainable model must keep can go:

- BatchNorm folded into the convolution or linear layer in front of it (`conv -> bn` becomes one
  conv with a bias). Exact up to float rounding, because an eval-mode BN is a fixed per-channel
  affine map of the conv's output. A BN *before* a padded convolution (IResNet's `bn1 -> conv1`)
  is not folded: the conv pads the BN's output with zeros, a folded shift would be padded too, so
  border pixels would change. Those BNs become a fixed `x * scale + shift` (`ChannelAffine`),
  which is the same arithmetic BN does in eval mode without the running-statistics bookkeeping.
  IResNet's `bn2 -> flatten -> fc` has no padding, so it folds into the fc exactly.
- fp32 weights under autocast: autocast re-casts every weight on every forward (about a hundred
  casts per IResNet-100 step). On CUDA the prepared copy holds its weights in the autocast dtype
  once (bf16, or fp16 with amp=fp16) and takes inputs in that dtype.
- eager execution: on CUDA the prepared forward is `torch.compile`d (config `compile_teacher`).

On CPU none of this is applied by default: folding was measured not to pay there (see
`prepare_teacher`), casting and compiling are CUDA-only choices.

`FrozenTeacher(x, with_stages)` returns `(stage maps, embedding)`: the stage maps only when asked
(a run without stage losses never materialises them) and in the compute dtype (the losses upcast).
The original module is left untouched: reports and exports keep using it in fp32.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ChannelAffine(nn.Module):
    """`x * scale + shift` per channel (dim 1): an eval-mode BatchNorm with its statistics baked in."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return torch.addcmul(self.shift.view(shape), x, self.scale.view(shape))


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 with bn(x) == x * scale + shift in eval mode."""
    var = bn.running_var.double() if bn.running_var is not None else torch.ones(bn.num_features, dtype=torch.float64)
    mean = bn.running_mean.double() if bn.running_mean is not None else torch.zeros(bn.num_features, dtype=torch.float64)
    weight = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - mean * scale


def _fold_after(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """`layer` (Conv2d or Linear) followed by `bn`, as one layer with a bias (float64 arithmetic)."""
    scale, shift = _bn_affine(bn)
    weight = layer.weight.double()
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    fused = copy.deepcopy(layer)
    shape = [-1] + [1] * (weight.dim() - 1)
    fused.weight = nn.Parameter((weight * scale.view(shape)).to(layer.weight.dtype), requires_grad=False)
    fused.bias = nn.Parameter((bias * scale + shift).to(layer.weight.dtype), requires_grad=False)
    return fused


def _fold_before_linear(bn: nn.Module, linear: nn.Linear, spatial: int) -> nn.Linear:
    """`bn` (over C channels) -> flatten (C x spatial) -> `linear` as one linear layer: exact, no padding."""
    scale, shift = _bn_affine(bn)
    scale, shift = scale.repeat_interleave(spatial), shift.repeat_interleave(spatial)
    weight = linear.weight.double()
    bias = linear.bias.double() if linear.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    fused = copy.deepcopy(linear)
    fused.weight = nn.Parameter((weight * scale.view(1, -1)).to(linear.weight.dtype), requires_grad=False)
    fused.bias = nn.Parameter((bias + weight @ shift).to(linear.weight.dtype), requires_grad=False)
    return fused


def _is_bn(module: Any) -> bool:
    return isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.track_running_stats


def _foldable(layer: Any, bn: Any) -> bool:
    if not _is_bn(bn):
        return False
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels == bn.num_features
    return isinstance(layer, nn.Linear) and layer.out_features == bn.num_features


def _fold_sequential(seq: nn.Sequential) -> int:
    """Fold every consecutive (conv|linear, bn) pair of a Sequential (its order is its data flow)."""
    names = list(seq._modules)
    folded = 0
    for first, second in zip(names, names[1:]):
        layer, bn = seq._modules[first], seq._modules[second]
        if _foldable(layer, bn):
            seq._modules[first] = _fold_after(layer, bn)
            seq._modules[second] = nn.Identity()
            folded += 1
    return folded


def _fold_pair(parent: nn.Module, layer_name: str, bn_name: str) -> int:
    layer, bn = getattr(parent, layer_name), getattr(parent, bn_name)
    if not _foldable(layer, bn):
        return 0
    setattr(parent, layer_name, _fold_after(layer, bn))
    setattr(parent, bn_name, nn.Identity())
    return 1


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """(an eval-mode copy of `model` with BN folded, number of BNs folded). Leftover BNs become
    `ChannelAffine`. Only patterns whose data flow is known are folded: Sequential runs, the
    IResNet stem/blocks/neck and the students' embedding head."""
    from shrinkcli.models.iresnet import IBasicBlock, IResNet
    from shrinkcli.models.layers import EmbeddingHead

    model = copy.deepcopy(model).eval()
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            folded += _fold_sequential(module)
        elif isinstance(module, IBasicBlock):     # bn1 -> conv1 -> bn2 -> prelu -> conv2 -> bn3
            folded += _fold_pair(module, "conv1", "bn2") + _fold_pair(module, "conv2", "bn3")
        elif isinstance(module, EmbeddingHead):   # ... -> linear -> bn
            folded += _fold_pair(module, "linear", "bn")
        elif isinstance(module, IResNet):
            folded += _fold_iresnet_ends(module)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if _is_bn(child):
                scale, shift = _bn_affine(child)
                dtype = child.running_mean.dtype
                parent._modules[name] = ChannelAffine(scale.to(dtype), shift.to(dtype))
    return model.requires_grad_(False), folded


def _fold_iresnet_ends(net: nn.Module) -> int:
    """Stem conv1 -> bn1, and the neck bn2 -> flatten -> (dropout, identity in eval) -> fc -> features."""
    folded = _fold_pair(net, "conv1", "bn1")
    if _is_bn(net.bn2) and isinstance(net.fc, nn.Linear):
        spatial = net.fc.in_features // net.bn2.num_features
        if spatial * net.bn2.num_features == net.fc.in_features:
            net.fc = _fold_before_linear(net.bn2, net.fc, spatial)
            net.bn2 = nn.Identity()
            folded += 1
    return folded + _fold_pair(net, "fc", "features")


class FrozenTeacher(nn.Module):
    """`forward(x, with_stages) -> (stage maps or (), embedding)` of a prepared teacher."""

    def __init__(self, teacher: nn.Module, dtype: torch.dtype | None):
        super().__init__()
        self.teacher = teacher
        self.dtype = dtype       # None: the weights' own dtype, inputs as given

    def forward(self, x: torch.Tensor, with_stages: bool = True):
        if self.dtype is not None:
            x = x.to(self.dtype)
        out = self.teacher.forward_features(x)
        return (tuple(out.stage_maps) if with_stages else ()), out.embedding


def _wants_compile(setting: str | bool | None, device: torch.device) -> bool:
    if isinstance(setting, bool):
        return setting
    if setting in (None, "auto"):
        # On CPU compiling an IResNet takes minutes of this machine's two cores and was not
        # measured to pay back (docs/benchmarks.md); on CUDA it removes the per-kernel overhead.
        return device.type == "cuda"
    return setting == "on"


def prepare_teacher(teacher: nn.Module, *, device: torch.device | str, autocast_dtype: torch.dtype | None = None,
                    channels_last: bool = False, compile: str | bool | None = "auto",
                    fold: bool | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(callable `(x, with_stages) -> (stages, embedding)`, what was done). `teacher` is not modified
    (when folding is off, the wrapper holds `teacher` itself). `fold=None`: on CUDA only.

    Teachers whose layers are not shrink's own (an ONNX import) are only frozen and moved: nothing
    in them is folded, and they run under the caller's autocast as before."""
    device = torch.device(device)
    info: dict[str, Any] = {"folded_bn": 0, "dtype": "float32", "compiled": False}
    if fold is None:
        # Measured on a 2-core CPU: the folded IResNet ran at 0.95-0.98x of the unfolded one (its
        # convolutions, not BN, take 90% of the time there), so CPU keeps the module as loaded.
        fold = device.type == "cuda"
    if fold:
        prepared, info["folded_bn"] = fold_batchnorm(teacher)
    else:
        prepared = teacher.eval().requires_grad_(False)
    prepared.to(device)
    dtype = None
    if device.type == "cuda" and autocast_dtype in (torch.bfloat16, torch.float16) and info["folded_bn"]:
        prepared.to(autocast_dtype)
        dtype = autocast_dtype
        info["dtype"] = str(autocast_dtype).replace("torch.", "")
    if channels_last:
        prepared.to(memory_format=torch.channels_last)
    wrapper: nn.Module = FrozenTeacher(prepared, dtype).eval()
    if _wants_compile(compile, device):
        wrapper = torch.compile(wrapper)
        info["compiled"] = True
    return wrapper, info
