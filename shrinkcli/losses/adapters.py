"""Adapters that map student features into the teacher's feature space for distillation.

Student stages are narrower than the teacher's (MobileFaceNet 64/64/128/128 vs IResNet
64/128/256/512), so each student stage map goes through a 1x1 conv + BatchNorm to the teacher's
channel count before the loss. When the spatial sizes differ (another stride layout), the student
map is first average-pooled to the teacher's size: pooling before the 1x1 conv is cheaper and,
both being linear, gives the same map as pooling after it.

Adapters are trained together with the student and dropped at export: the deployed student is the
backbone alone. When the student's embedding size differs from the teacher's, a bias-free linear
map does the same for the embedding.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class StageAdapters(nn.Module):
    """Per stage `k`: student map `[N, Cs_k, h, w]` -> `[N, Ct_k, H, W]` (1x1 conv + BN, pooling if needed).

    `embedding_sizes=(student, teacher)`: when they differ, `adapt_embedding` applies a learned
    linear map; when equal it is the identity (no parameters), so the paper's plain setting is kept.
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int],
                 embedding_sizes: tuple[int, int] | None = None):
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(f"stage counts differ: student {len(student_channels)} vs teacher {len(teacher_channels)}")
        self.student_channels = [int(c) for c in student_channels]
        self.teacher_channels = [int(c) for c in teacher_channels]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cs, ct, kernel_size=1, bias=False), nn.BatchNorm2d(ct))
            for cs, ct in zip(self.student_channels, self.teacher_channels)
        )
        self.embedding: nn.Module = nn.Identity()
        if embedding_sizes is not None and embedding_sizes[0] != embedding_sizes[1]:
            self.embedding = nn.Linear(embedding_sizes[0], embedding_sizes[1], bias=False)

    def adapt_stage(self, index: int, student_map: torch.Tensor, teacher_hw: Sequence[int]) -> torch.Tensor:
        """Map one student stage output onto the teacher's channels and spatial size."""
        if tuple(student_map.shape[-2:]) != tuple(teacher_hw):
            student_map = F.adaptive_avg_pool2d(student_map, tuple(teacher_hw))
        return self.stages[index](student_map)

    def adapt_embedding(self, student_embedding: torch.Tensor) -> torch.Tensor:
        return self.embedding(student_embedding)

    def forward(self, student_stages: Sequence[torch.Tensor],
                teacher_sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """All stages at once: `teacher_sizes[k]` is the (H, W) of teacher stage k."""
        return [self.adapt_stage(k, s, hw) for k, (s, hw) in enumerate(zip(student_stages, teacher_sizes))]
