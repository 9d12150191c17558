"""Tiny task, model and dataset for the engine tests (imported by the other test_engine* files)."""

from __future__ import annotations

import torch
from torch import nn

from shrinkcli.config import TrainConfig
from shrinkcli.losses.margin import MarginHead


class ToyBackbone(nn.Module):
    """conv-BN-PReLU-pool-linear: has every parameter kind the optimizer groups care about."""

    def __init__(self, embedding_size: int = 8, norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False)
        # Without BatchNorm a step's loss does not depend on how the batch is split over processes.
        self.bn = nn.BatchNorm2d(6) if norm else nn.Identity()
        self.act = nn.PReLU(6)
        self.fc = nn.Linear(6, embedding_size)
        self.arch, self.arch_kwargs = "toy", {"embedding_size": embedding_size}

    def forward(self, x):
        return self.fc(self.act(self.bn(self.conv(x))).mean((2, 3)))


class ToyFaces(torch.utils.data.Dataset):
    """Class-dependent colour blobs with noise and a left/right asymmetry (so flips matter)."""

    def __init__(self, count: int = 48, num_classes: int = 4, size: int = 16, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.labels_t = torch.arange(count) % num_classes
        centres = torch.randn(num_classes, 3, 1, 1, generator=generator)
        ramp = torch.linspace(-1, 1, size).view(1, 1, size)
        self.images = centres[self.labels_t] * ramp + 0.3 * torch.randn(count, 3, size, size, generator=generator)
        self.num_classes = num_classes
        self.labels = self.labels_t.numpy()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels_t[i]), i


class ToyTask:
    def __init__(self, num_classes: int = 4, sample_rate: float = 1.0, nan_at_steps=(), norm: bool = True):
        self.backbone = ToyBackbone(norm=norm)
        self.head = MarginHead(8, num_classes, kind="cosface", scale=16.0, sample_rate=sample_rate)
        self.nan_at_steps = set(nan_at_steps)
        self.calls = 0
        self.seen_flips: list[torch.Tensor] = []

    def modules(self):
        return {"backbone": self.backbone, "head": self.head}

    def distribute(self, wrap):
        self.backbone_step, self.head_step = wrap(self.backbone), wrap(self.head)

    def loss(self, images, labels, indices, flipped):
        self.calls += 1
        self.seen_flips.append(flipped.cpu())
        backbone, head = getattr(self, "backbone_step", self.backbone), getattr(self, "head_step", self.head)
        loss = head(backbone(images), labels)
        if self.calls in self.nan_at_steps:
            loss = loss * float("nan")
        return loss, {"margin": loss.detach()}

    def embedder(self):
        return self.backbone


def toy_config(**changes) -> TrainConfig:
    base = dict(input_size=16, workers=0, epochs=2, batch_size=8, lr=0.05, warmup_epochs=0.5,
                log_every=1, device="cpu", amp="off", seed=3)
    base.update(changes)
    return TrainConfig(**base)


def test_toy_dataset_returns_index_and_never_flips():
    data = ToyFaces(count=8)
    image, label, index = data[5]
    assert index == 5 and label == 1 and image.shape == (3, 16, 16)
    assert torch.equal(data[5][0], image)
