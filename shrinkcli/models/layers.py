"""Building blocks shared by the student networks (MobileFaceNet, MobileNetV1/V2, MFNR).

All students share one skeleton, `StagedFaceNet`: four stage modules whose outputs land at
strides 2/4/8/16 of the input, followed by an embedding head. Keeping the skeleton in one place
means every student exposes identical `forward_features` semantics for distillation.
"""

from __future__ import annotations

import torch
from torch import nn

from shrinkcli.errors import BadInputError
from shrinkcli.models.prelu import PReLU
from shrinkcli.models.base import FaceOutput


def scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier; never below 8 so tiny test models stay valid."""
    return max(8, int(round(channels * width)))


def check_input_size(input_size: int, arch: str) -> int:
    if not isinstance(input_size, int) or input_size < 16 or input_size % 16:
        raise BadInputError(
            f"{arch}: input_size must be a positive multiple of 16, got {input_size!r}",
            hint="use e.g. 112 (standard aligned faces), 64 or 32",
        )
    return input_size


def check_width(width: float, arch: str) -> float:
    if not isinstance(width, (int, float)) or width <= 0:
        raise BadInputError(f"{arch}: width must be a positive number, got {width!r}")
    return float(width)


def activation(act: str, channels: int) -> nn.Module:
    """PReLU (the face-recognition default) or ReLU, which int8 runtimes fuse into the convolution."""
    if act == "prelu":
        return PReLU(channels)
    if act == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"unknown activation {act!r} (prelu or relu)")


class ConvBlock(nn.Sequential):
    """Conv (no bias) -> BN -> PReLU/ReLU; `linear=True` drops the activation (bottleneck projections, GDConv)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 linear: bool = False, padding: int | None = None, act: str = "prelu"):
        padding = kernel // 2 if padding is None else padding
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if not linear:
            layers.append(activation(act, out_ch))
        super().__init__(*layers)


class Shortcut(nn.Module):
    """Projection shortcut for blocks that change resolution or width (ResNet-D style: the
    average pool keeps all input pixels instead of a strided 1x1 conv that drops 3 in 4)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.pool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()
        self.proj = ConvBlock(in_ch, out_ch, 1, linear=True) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 / MobileFaceNet bottleneck: 1x1 expand -> 3x3 depthwise -> linear 1x1 project.

    The identity shortcut is used when shape is preserved; `always_shortcut` adds a projection
    shortcut to the other blocks too (the MFNR student)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: float,
                 always_shortcut: bool = False, act: str = "prelu"):
        super().__init__()
        hidden = max(8, int(round(in_ch * expansion)))
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBlock(in_ch, hidden, 1, act=act))
        layers += [ConvBlock(hidden, hidden, 3, stride, groups=hidden, act=act),
                   ConvBlock(hidden, out_ch, 1, linear=True)]
        self.conv = nn.Sequential(*layers)
        self.identity = stride == 1 and in_ch == out_ch
        self.shortcut = Shortcut(in_ch, out_ch, stride) if always_shortcut and not self.identity else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.identity:
            return out + x
        if self.shortcut is not None:
            return out + self.shortcut(x)
        return out


def bottleneck_group(in_ch: int, out_ch: int, repeats: int, stride: int, expansion: float,
                     always_shortcut: bool = False, act: str = "prelu") -> list[nn.Module]:
    blocks = [InvertedResidual(in_ch, out_ch, stride, expansion, always_shortcut, act)]
    blocks += [InvertedResidual(out_ch, out_ch, 1, expansion, always_shortcut, act) for _ in range(repeats - 1)]
    return blocks


class EmbeddingHead(nn.Module):
    """GDConv head: a linear depthwise conv whose kernel covers the whole final map (input/16),
    so each channel learns its own spatial weighting instead of a uniform average pool; then a
    bias-free linear layer and BatchNorm1d give the embedding (MobileFaceNet paper, Sec. 3)."""

    def __init__(self, channels: int, final_map: int, embedding_size: int, dropout: float = 0.0):
        super().__init__()
        self.gdc = ConvBlock(channels, channels, final_map, groups=channels, linear=True, padding=0)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(channels, embedding_size, bias=False)
        self.bn = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.gdc(x), 1)
        return self.bn(self.linear(self.dropout(x)))


class StagedFaceNet(nn.Module):
    """Skeleton of every student: stem+stage1..stage4 (strides 2/4/8/16), optional pre-head
    conv, embedding head. `forward` returns the embedding only."""

    def __init__(self, stages: list[nn.Module], neck: nn.Module, head_channels: int,
                 stage_channels: list[int], embedding_size: int, input_size: int, dropout: float):
        super().__init__()
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.neck = neck
        self.head = EmbeddingHead(head_channels, input_size // 16, embedding_size, dropout)
        self.stage_channels = list(stage_channels)
        self.embedding_size = embedding_size
        self.input_size = input_size
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> FaceOutput:
        s1 = self.stage1(x)
        s2 = self.stage2(s1)
        s3 = self.stage3(s2)
        s4 = self.stage4(s3)
        return FaceOutput(stage_maps=[s1, s2, s3, s4], embedding=self.head(self.neck(s4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).embedding


def init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
