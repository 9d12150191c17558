"""MobileNetV1 (Howard et al. 2017) and MobileNetV2 (Sandler et al. 2018) adapted to 112x112 faces.

ImageNet MobileNets reach stride 32; on a 112 face that leaves a 4x4 map, too coarse for the
GDConv head and misaligned with the teachers' 56/28/14/7 stages. We keep the standard layers and
widths but set the stride of the last downsampling group to 1, so the network ends at stride 16
(7x7 at 112). ReLU/ReLU6 become PReLU as in MobileFaceNet, and the classifier is replaced by the
GDConv embedding head (linear depthwise conv over the whole map -> linear -> BN1d).

Stage outputs at 112x112 (width 1):
    mobilenetv1: 64@56 (after dw 64), 128@28, 256@14, 1024@7
    mobilenetv2: 16@56 (after t1 c16), 24@28, 32@14, 320@7 (last bottleneck, before conv1x1 1280)
"""

from __future__ import annotations

from torch import nn

from shrinkcli.models.layers import (ConvBlock, StagedFaceNet, bottleneck_group, check_input_size,
                                     check_width, scaled)
from shrinkcli.models.base import register_model


def _separable(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(ConvBlock(in_ch, in_ch, 3, stride, groups=in_ch), ConvBlock(in_ch, out_ch, 1))


@register_model("mobilenetv1", "student")
def mobilenetv1(embedding_size: int = 512, input_size: int = 112, width: float = 1.0,
                dropout: float = 0.0) -> StagedFaceNet:
    """MobileNetV1, 13 depthwise-separable blocks; the stride-2 block into 1024 channels is stride 1."""
    check_input_size(input_size, "mobilenetv1")
    width = check_width(width, "mobilenetv1")
    c = {n: scaled(n, width) for n in (32, 64, 128, 256, 512, 1024)}
    stage1 = nn.Sequential(ConvBlock(3, c[32], 3, 2), _separable(c[32], c[64], 1))
    stage2 = nn.Sequential(_separable(c[64], c[128], 2), _separable(c[128], c[128], 1))
    stage3 = nn.Sequential(_separable(c[128], c[256], 2), _separable(c[256], c[256], 1))
    stage4 = nn.Sequential(_separable(c[256], c[512], 2), *[_separable(c[512], c[512], 1) for _ in range(5)],
                           _separable(c[512], c[1024], 1), _separable(c[1024], c[1024], 1))
    return StagedFaceNet([stage1, stage2, stage3, stage4], nn.Identity(), c[1024],
                         [c[64], c[128], c[256], c[1024]], embedding_size, input_size, dropout)


# (expansion, channels, repeats, stride) -- Sandler et al. Table 2, with the 160-channel group's
# stride set to 1 so the network ends at stride 16.
_V2_GROUPS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 1),
              (6, 320, 1, 1)]


@register_model("mobilenetv2", "student")
def mobilenetv2(embedding_size: int = 512, input_size: int = 112, width: float = 1.0,
                dropout: float = 0.0) -> StagedFaceNet:
    """MobileNetV2 (17 inverted residuals + conv1x1 1280) ending at stride 16."""
    check_input_size(input_size, "mobilenetv2")
    width = check_width(width, "mobilenetv2")
    stem = scaled(32, width)
    blocks: list[list[nn.Module]] = []
    in_ch = stem
    for expansion, channels, repeats, stride in _V2_GROUPS:
        out_ch = scaled(channels, width)
        blocks.append(bottleneck_group(in_ch, out_ch, repeats, stride, expansion))
        in_ch = out_ch
    stage1 = nn.Sequential(ConvBlock(3, stem, 3, 2), *blocks[0])
    stage2 = nn.Sequential(*blocks[1])
    stage3 = nn.Sequential(*blocks[2])
    stage4 = nn.Sequential(*blocks[3], *blocks[4], *blocks[5], *blocks[6])
    head_ch = scaled(1280, max(width, 1.0))  # as in the paper: the last conv never narrows below 1280
    neck = ConvBlock(in_ch, head_ch, 1)
    channels = [scaled(c, width) for c in (16, 24, 32, 320)]
    return StagedFaceNet([stage1, stage2, stage3, stage4], neck, head_ch, channels, embedding_size, input_size,
                         dropout)
