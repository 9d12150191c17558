"""Feature distillation losses between a student and a frozen teacher.

Every loss takes two tensors of the same shape `[N, ...]` (an embedding batch `[N, D]` or a stage
map batch `[N, C, H, W]`) and returns a scalar averaged over the N samples:

- ``angular``: ShrinkTeaNet Eq. 4, ``mean_i (1 - cos(F_t^i, F_s^i))^2`` with each sample flattened
  to one vector before the cosine; it matches only the *direction* of the teacher's features, so the
  student is free in scale (a small network cannot match the teacher's magnitudes anyway);
- ``cosine``: ``mean_i (1 - cos(F_t^i, F_s^i))``, the unsquared variant; its gradient does not
  vanish as the student approaches the teacher, which helps late in training;
- ``l2``: FitNets-style mean squared error of the raw features, ``mean over all elements (F_s - F_t)^2``;
  sensitive to scale, so it relies on the adapters to match magnitudes;
- ``none``: always 0 (the term is switched off).

Cosines are computed in float32 whatever the input dtype (teacher maps may be cached in fp16, or
produced under bf16 autocast), because `1 - cos` near 0 loses all precision in half types.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from shrinkcli.errors import BadInputError

LOSS_NAMES = ("angular", "cosine", "l2", "none")

# Zero vectors (e.g. a dead ReLU map) get cosine 0, not NaN: their loss is 1 (angular/cosine).
_COSINE_EPS = 1e-8

DistillLossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"distillation needs equal shapes, got student {tuple(student.shape)} "
                         f"vs teacher {tuple(teacher.shape)} (use StageAdapters to map the student)")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def per_sample_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cosine between each student sample and its teacher sample, both flattened: shape [N]."""
    _check_shapes(student, teacher)
    s = _at_least_fp32(student.reshape(student.shape[0], -1))
    t = _at_least_fp32(teacher.reshape(teacher.shape[0], -1)).to(s.dtype)
    return F.cosine_similarity(s, t, dim=1, eps=_COSINE_EPS)


def angular_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """ShrinkTeaNet Eq. 4: `mean_i (1 - cos(F_t^i, F_s^i))^2`."""
    return (1.0 - per_sample_cosine(student, teacher)).pow(2).mean()


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """`mean_i (1 - cos(F_t^i, F_s^i))`."""
    return (1.0 - per_sample_cosine(student, teacher)).mean()


def l2_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss: mean over every element of `(F_s - F_t)^2`."""
    _check_shapes(student, teacher)
    s = _at_least_fp32(student)
    return F.mse_loss(s, _at_least_fp32(teacher).to(s.dtype))


def no_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    # Keep the graph connected (zero gradient) so optimizers and DDP see every parameter used.
    return student.sum() * 0.0


_LOSSES: dict[str, DistillLossFn] = {
    "angular": angular_loss,
    "cosine": cosine_loss,
    "l2": l2_loss,
    "none": no_loss,
}


def get_distill_loss(name: str) -> DistillLossFn:
    """The loss function for a config name (angular, cosine, l2, none)."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise BadInputError(f"unknown distillation loss {name!r}",
                            hint=f"choose one of: {', '.join(LOSS_NAMES)}") from None


def is_active(name: str, weight: float) -> bool:
    """Whether a loss term contributes at all (lets callers skip computing its inputs)."""
    return name != "none" and weight != 0.0


class DistillCriterion(torch.nn.Module):
    """The distillation part of the ShrinkTeaNet objective, with its trainable adapters:

    `L_distill = embed_weight * L(adapt(e_s), e_t) + sum_k stage_weights[k] * L(adapt_k(s_k), t_k)`.

    The adapters (`self.adapters`) are trained with the student and never exported.
    """

    def __init__(self, *, student_channels: list[int], teacher_channels: list[int],
                 student_embedding: int, teacher_embedding: int,
                 embed_loss: str = "angular", stage_loss: str = "angular",
                 embed_weight: float = 1.0, stage_weights: list[float] | tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)):
        super().__init__()
        from shrinkcli.losses.adapters import StageAdapters

        if len(stage_weights) != len(teacher_channels):
            raise BadInputError(f"stage_weights has {len(stage_weights)} values for {len(teacher_channels)} stages")
        self.embed_fn = get_distill_loss(embed_loss)
        self.stage_fn = get_distill_loss(stage_loss)
        self.embed_weight = float(embed_weight)
        self.stage_weights = [float(w) for w in stage_weights]
        self.embed_active = is_active(embed_loss, self.embed_weight)
        self.active_stages = [k for k, w in enumerate(self.stage_weights) if is_active(stage_loss, w)]
        self.adapters = StageAdapters(student_channels, teacher_channels,
                                      embedding_sizes=(student_embedding, teacher_embedding))

    def freeze_unused_adapters(self) -> None:
        """Adapters of inactive terms never see a gradient; marking them frozen keeps them out of
        the optimizer and of DDP, which would otherwise wait for their gradients forever."""
        for k, adapter in enumerate(self.adapters.stages):
            adapter.requires_grad_(k in self.active_stages)
        self.adapters.embedding.requires_grad_(self.embed_active)

    @property
    def needs_teacher_stages(self) -> bool:
        return bool(self.active_stages)

    @property
    def needs_teacher(self) -> bool:
        """False for a margin-only baseline: then no teacher forward is spent at all."""
        return self.embed_active or bool(self.active_stages)

    def forward(self, student_stages: list[torch.Tensor], student_embedding: torch.Tensor,
                teacher_stages: list[torch.Tensor] | None, teacher_embedding: torch.Tensor | None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total weighted distillation loss and each unweighted term (detached) for logging."""
        total = student_embedding.sum() * 0.0
        terms: dict[str, torch.Tensor] = {}
        if self.embed_active:
            value = self.embed_fn(self.adapters.adapt_embedding(student_embedding), teacher_embedding)
            total = total + self.embed_weight * value
            terms["distill_emb"] = value.detach()
        for k in self.active_stages:
            target = teacher_stages[k]
            value = self.stage_fn(self.adapters.adapt_stage(k, student_stages[k], target.shape[-2:]), target)
            total = total + self.stage_weights[k] * value
            terms[f"distill_s{k + 1}"] = value.detach()
        return total, terms
