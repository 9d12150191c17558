"""Margin softmax heads for face recognition: ArcFace and CosFace, with PartialFC-style sampling.

ArcFace (Deng et al. 2019): the target logit is s*cos(theta + m) (default s=64, m=0.5). We use the
standard, easy-margin-free formulation: where theta + m would pass pi, cos(theta + m) stops being
monotonic in theta, so the target logit falls back to cos(theta) - m*sin(m) there.
CosFace (Wang et al. 2018): the target logit is s*(cos(theta) - m) (default m=0.35).

PartialFC (An et al. 2021): with `sample_rate < 1` each step scores the batch only against the
class centres of its own labels plus random negative centres, up to `sample_rate * num_classes`;
million-class heads then cost a fraction of the memory and compute per step.
This is the single-process head; under torchrun the learned centres are sharded over the ranks
instead (shrinkcli.losses.partial_fc.ShardedMarginHead, chosen by `margin_head`), with the same
hyper-parameters and the same checkpoint key.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from shrinkcli.errors import BadInputError

DEFAULT_MARGINS = {"arcface": 0.5, "cosface": 0.35}


class MarginHead(nn.Module):
    """Class centres + margin softmax. `forward(embeddings, labels) -> mean cross-entropy loss`."""

    def __init__(self, embedding_size: int, num_classes: int, *, kind: str = "arcface",
                 margin: float | None = None, scale: float = 64.0, sample_rate: float = 1.0):
        super().__init__()
        if kind not in DEFAULT_MARGINS:
            raise BadInputError(f"unknown margin head {kind!r}", hint="use arcface or cosface")
        if num_classes < 2:
            raise BadInputError(f"a margin head needs at least 2 identities, got {num_classes}",
                                hint="check the training data: every folder/label is one identity")
        if not 0.0 < sample_rate <= 1.0:
            raise BadInputError(f"sample_rate={sample_rate} must be in (0, 1]", hint="e.g. --sample-rate 0.3")
        self.kind = kind
        self.margin = DEFAULT_MARGINS[kind] if margin is None else float(margin)
        self.scale = float(scale)
        self.sample_rate = float(sample_rate)
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    @property
    def num_sampled(self) -> int:
        return max(1, int(round(self.sample_rate * self.num_classes)))

    def sample_centres(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(indices of the centres used this step or None for all, labels remapped into them).

        All positives are always kept; the remaining slots go to negatives drawn uniformly from
        the global torch RNG, whose state the engine checkpoints, so resumed runs draw the same.
        """
        if self.sample_rate >= 1.0 or not self.training:
            return None, labels
        scores = torch.rand(self.num_classes, device=labels.device)
        scores[labels] = 2.0  # positives outrank every random score
        count = self.num_sampled
        if count < len(labels):
            # Counting distinct labels reads the device (a host sync); only a batch larger than the
            # sampled set can hold more positives than num_sampled, so only then is it counted.
            count = max(count, int(torch.unique(labels).numel()))
        chosen = torch.topk(scores, k=count).indices.sort().values
        return chosen, torch.searchsorted(chosen, labels)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled logits with the margin applied to each row's target, and the (remapped) labels."""
        chosen, labels = self.sample_centres(labels)
        weight = self.weight if chosen is None else self.weight.index_select(0, chosen)
        # Margins on cosines near +-1 need full precision: never run this part in bf16/fp16.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cosine = F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(weight.float(), dim=1))
            cosine = cosine.clamp(-1.0, 1.0)
            target = cosine.gather(1, labels.view(-1, 1))
            target_with_margin = self._apply_margin(target)
            logits = cosine.scatter(1, labels.view(-1, 1), target_with_margin)
        return logits * self.scale, labels

    def _apply_margin(self, cos_t: torch.Tensor) -> torch.Tensor:
        m = self.margin
        if self.kind == "cosface":
            return cos_t - m
        # The tiny floor keeps d/dcos of sqrt finite when a target is already at cos = +-1.
        sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp_min(1e-12))
        cos_t_plus_m = cos_t * math.cos(m) - sin_t * math.sin(m)
        beyond_pi = cos_t <= math.cos(math.pi - m)
        return torch.where(beyond_pi, cos_t - math.sin(math.pi - m) * m, cos_t_plus_m)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Labels are range-checked once per dataset by the caller: a per-step check would force a
        # device sync on every step.
        logits, labels = self.logits(embeddings, labels.long())
        return F.cross_entropy(logits, labels)

    def extra_repr(self) -> str:
        return (f"{self.kind}, classes={self.num_classes}, dim={self.embedding_size}, m={self.margin}, "
                f"s={self.scale}, sample_rate={self.sample_rate}")
