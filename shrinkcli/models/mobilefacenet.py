"""MobileFaceNet (Chen et al. 2018) and MFNR, the residual-shortcut variant used as a fourth student.

Layout at 112x112 (t = expansion, c = channels, n = repeats, s = stride):

    conv3x3 s2 64            -> 64@56
    dw3x3 64                 -> 64@56    stage1
    bottleneck t2 c64 n5 s2  -> 64@28    stage2
    bottleneck t4 c128 n1 s2
    bottleneck t2 c128 n6    -> 128@14   stage3
    bottleneck t4 c128 n1 s2
    bottleneck t2 c128 n2    -> 128@7    stage4
    conv1x1 512 -> GDConv 7x7 (linear) -> linear -> BN1d -> embedding

Stage 4 is taken before the 1x1 expansion to 512 so that every stage output is the output of a
residual group (the same kind of tensor at every stage), not a widened projection of one.
"""

from __future__ import annotations

from torch import nn

from shrinkcli.models.layers import (ConvBlock, StagedFaceNet, bottleneck_group, check_input_size,
                                     check_width, scaled)
from shrinkcli.models.base import register_model


def _build(arch: str, embedding_size: int, input_size: int, width: float, dropout: float,
           always_shortcut: bool, act: str = "prelu") -> StagedFaceNet:
    check_input_size(input_size, arch)
    width = check_width(width, arch)
    c64, c128, c512 = scaled(64, width), scaled(128, width), scaled(512, width)
    stage1 = nn.Sequential(ConvBlock(3, c64, 3, 2, act=act), ConvBlock(c64, c64, 3, 1, groups=c64, act=act))
    stage2 = nn.Sequential(*bottleneck_group(c64, c64, 5, 2, 2, always_shortcut, act))
    stage3 = nn.Sequential(*bottleneck_group(c64, c128, 1, 2, 4, always_shortcut, act),
                           *bottleneck_group(c128, c128, 6, 1, 2, always_shortcut, act))
    stage4 = nn.Sequential(*bottleneck_group(c128, c128, 1, 2, 4, always_shortcut, act),
                           *bottleneck_group(c128, c128, 2, 1, 2, always_shortcut, act))
    neck = ConvBlock(c128, c512, 1, act=act)
    return StagedFaceNet([stage1, stage2, stage3, stage4], neck, c512, [c64, c64, c128, c128],
                         embedding_size, input_size, dropout)


@register_model("mobilefacenet", "student")
def mobilefacenet(embedding_size: int = 512, input_size: int = 112, width: float = 1.0,
                  dropout: float = 0.0) -> StagedFaceNet:
    """MobileFaceNet: 0.99M params at 128-d, 1.20M at 512-d (112x112)."""
    return _build("mobilefacenet", embedding_size, input_size, width, dropout, always_shortcut=False)


@register_model("mobilefacenet-relu", "student")
def mobilefacenet_relu(embedding_size: int = 512, input_size: int = 112, width: float = 1.0,
                       dropout: float = 0.0) -> StagedFaceNet:
    """MobileFaceNet with ReLU for int8 deployment: onnxruntime fuses ReLU into int8 convolutions,
    PReLU it cannot (measured 1.8x int8 speed-up vs 1.0-1.3x with PReLU, see docs/benchmarks.md)."""
    return _build("mobilefacenet-relu", embedding_size, input_size, width, dropout, always_shortcut=False,
                  act="relu")
