"""IResNet teachers, module-for-module compatible with insightface's arcface_torch `iresnet.py`.

Module and parameter names (conv1, bn1, prelu, layer1..4 of IBasicBlock, bn2, dropout, fc,
features) match insightface exactly, so its `backbone.pth` files load with `strict=True`.

Depth convention (the one insightface's names follow): weighted layers = stem conv + 2 convs per
block + fc; the 1x1 downsample convs on the shortcut are not counted. So depth = 2*sum(blocks) + 2:
r18 [2,2,2,2], r34 [3,4,6,3], r50 [3,4,14,3], r100 [3,13,30,3]. insightface's r200
[6,26,60,6] is kept as published although it counts 198 layers this way (its name is nominal).

r90 (our choice; no public layout exists): [3, 8, 30, 3] = 44 blocks -> 2*44 + 2 = 90 layers.
It is r100 with stage 2 cut from 13 to 8 blocks: stage 3 (14x14, where insightface's deep
models put their depth) stays at r100's 30 blocks, and the removed blocks sit where they
cost the most MACs per parameter: r90 keeps 98% of r100's parameters (63.7M) with 10% fewer MACs
(10.9G vs 12.1G at 112x112).
"""

from __future__ import annotations

import torch
from torch import nn

from shrinkcli.models.layers import check_input_size, check_width, scaled
from shrinkcli.models.prelu import PReLU
from shrinkcli.models.base import FaceOutput, register_model

IRESNET_LAYOUTS: dict[str, list[int]] = {
    "r18": [2, 2, 2, 2],
    "r34": [3, 4, 6, 3],
    "r50": [3, 4, 14, 3],
    "r90": [3, 8, 30, 3],
    "r100": [3, 13, 30, 3],
    "r200": [6, 26, 60, 6],
}
STAGE_BASE_CHANNELS = (64, 128, 256, 512)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the (projected) input."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=1e-05)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=1e-05)
        self.prelu = PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    def __init__(self, layers: list[int], embedding_size: int = 512, input_size: int = 112,
                 width: float = 1.0, dropout: float = 0.0):
        super().__init__()
        check_input_size(input_size, "iresnet")
        width = check_width(width, "iresnet")
        channels = [scaled(c, width) for c in STAGE_BASE_CHANNELS]
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0], eps=1e-05)
        self.prelu = PReLU(channels[0])
        in_ch = channels[0]
        for index, (blocks, out_ch) in enumerate(zip(layers, channels), start=1):
            setattr(self, f"layer{index}", self._make_layer(in_ch, out_ch, blocks))
            in_ch = out_ch
        self.bn2 = nn.BatchNorm2d(in_ch, eps=1e-05)
        # inplace=False (insightface uses True): in-place dropout on a flatten view breaks autograd
        # when the pre-flatten map is reused; there are no parameters, so state_dicts are unaffected.
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch * (input_size // 16) ** 2, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)
        self.stage_channels = channels
        self.embedding_size = embedding_size
        self.input_size = input_size
        self._init_weights()

    @staticmethod
    def _make_layer(in_ch: int, out_ch: int, blocks: int) -> nn.Sequential:
        # Every stage starts with a stride-2 block, so layer1 already has a projection shortcut.
        downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, 2, bias=False), nn.BatchNorm2d(out_ch, eps=1e-05))
        return nn.Sequential(IBasicBlock(in_ch, out_ch, 2, downsample),
                             *[IBasicBlock(out_ch, out_ch) for _ in range(blocks - 1)])

    def _init_weights(self) -> None:
        # insightface's init (N(0, 0.1) convs, unit BN) plus a zero scale on each block's last BN
        # (its `zero_init_residual` option, Goyal et al. 2017): every block starts as its shortcut.
        # Without it a fresh model in eval mode amplifies activations ~2x per block (r50 reaches
        # 1e10, r200 overflows to NaN), which breaks smoke tests, exports and parity checks of
        # untrained models; training itself normalises with batch statistics either way.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, IBasicBlock):
                nn.init.zeros_(module.bn3.weight)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

    def forward_features(self, x: torch.Tensor) -> FaceOutput:
        x = self.prelu(self.bn1(self.conv1(x)))
        s1 = self.layer1(x)
        s2 = self.layer2(s1)
        s3 = self.layer3(s2)
        s4 = self.layer4(s3)
        x = torch.flatten(self.bn2(s4), 1)
        embedding = self.features(self.fc(self.dropout(x)))
        return FaceOutput(stage_maps=[s1, s2, s3, s4], embedding=embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).embedding


def _register(name: str) -> None:
    layers = IRESNET_LAYOUTS[name]

    @register_model(name, "teacher")
    def factory(embedding_size: int = 512, input_size: int = 112, width: float = 1.0,
                dropout: float = 0.0) -> IResNet:
        return IResNet(layers, embedding_size, input_size, width, dropout)

    factory.__doc__ = f"IResNet-{name[1:]}, blocks per stage {layers}."


for _name in IRESNET_LAYOUTS:
    _register(_name)

