"""Batch-relation distillation: the student keeps the teacher's pairwise structure, not its features.

Both objectives compare the N x N cosine-similarity matrices of a batch's embeddings,
`S_ij = <e_i, e_j> / (|e_i| |e_j|)`, so they need no adapter when the student's embedding size
differs from the teacher's.

- ``similarity_preserving_loss`` (Tung & Mori, "Similarity-Preserving Knowledge Distillation",
  ICCV 2019, Eq. 1-4): each row of S is L2-normalised, `G_i = S_i / |S_i|`, and
  `L_sp = 1/N^2 * ||G_t - G_s||_F^2`. The paper builds S from activation maps; like the face
  re-implementation in the EKD authors' code, we use the embeddings (L2-normalised first).
- ``EKDLoss`` (Huang, Wu, Xu, Ding, "Evaluation-oriented Knowledge Distillation for Deep Face
  Recognition", CVPR 2022): from the batch's negative pairs, thresholds at target false-positive
  rates (the similarity ranked `n_neg // (1/FPR)` from the top) are tracked by a moving average
  per model. Each pair gets a soft *rank*: the number of thresholds its similarity passes,
  `r(s) = sum_k sigmoid((s - tau_k) / T)`. With a small temperature T only pairs close to a
  threshold (the critical pairs, those that move the TPR/FPR at that operating point) have a rank
  that is neither 0 nor 1 per threshold, and so a gradient. The loss is the squared difference of
  student and teacher ranks over the positive pairs and over the top-k hardest negatives (by
  student similarity): `L_ekd = w_pos * mean_pos (r_s - r_t)^2 + w_neg * mean_topk (r_s - r_t)^2`.
  Defaults are the values of the authors' released implementation (Tencent TFace,
  recognition/tasks/ekd/distillation/ekd.py); see docs/losses.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shrinkcli.errors import BadInputError

EKD_FPRS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
EKD_TOPK = 2000
EKD_TEMPERATURE = 0.01
EKD_MOMENTUM = 0.01
EKD_POS_WEIGHT = 0.02
EKD_NEG_WEIGHT = 0.01
SP_WEIGHT = 3000.0          # gamma of Tung & Mori 2019 (their CIFAR-10 setting)


def cosine_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """`[N, D] -> [N, N]` cosine similarities, in float32 whatever the input dtype."""
    x = embeddings.reshape(embeddings.shape[0], -1).float()
    x = F.normalize(x, dim=1, eps=1e-8)
    return x @ x.t()


def similarity_preserving_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """SP: `1/N^2 ||rownorm(S_t) - rownorm(S_s)||_F^2` on the batch cosine matrices."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"batch sizes differ: student {student.shape[0]} vs teacher {teacher.shape[0]}")
    n = student.shape[0]
    g_s = F.normalize(cosine_matrix(student), dim=1)
    g_t = F.normalize(cosine_matrix(teacher), dim=1)
    return (g_t - g_s).pow(2).sum() / (n * n)


class EKDLoss(nn.Module):
    """Evaluation-oriented rank distillation. `forward(student, teacher, labels=None) -> (loss, logs)`.

    Without labels every pair of the batch is treated as a negative: true for nearly all pairs of
    a batch drawn from thousands of identities, and a stray same-identity pair only has its rank
    matched to the teacher's, which is what the teacher says about it anyway. The positive term
    then drops out.
    """

    def __init__(self, fprs=EKD_FPRS, topk: int = EKD_TOPK, temperature: float = EKD_TEMPERATURE,
                 momentum: float = EKD_MOMENTUM, pos_weight: float = EKD_POS_WEIGHT,
                 neg_weight: float = EKD_NEG_WEIGHT):
        super().__init__()
        fprs = [float(f) for f in fprs]
        if not fprs or not all(0.0 < f < 1.0 for f in fprs):
            raise BadInputError(f"ekd_fprs={fprs} must be false-positive rates in (0, 1)", hint="e.g. 1e-1,1e-2,1e-3")
        if topk < 1 or not temperature > 0 or not 0.0 < momentum <= 1.0:
            raise BadInputError(f"EKD needs topk >= 1, temperature > 0 and momentum in (0, 1]; got "
                                f"{topk}, {temperature}, {momentum}")
        # `n // round(1/FPR)` as in the authors' code: the same index for every batch size they used.
        self.inverse_fprs = [max(1, round(1.0 / f)) for f in fprs]
        self.topk, self.temperature, self.momentum = int(topk), float(temperature), float(momentum)
        self.pos_weight, self.neg_weight = float(pos_weight), float(neg_weight)
        # Thresholds are moving averages over steps: checkpointed so a resumed run continues them.
        self.register_buffer("student_thresholds", torch.zeros(len(fprs)))
        self.register_buffer("teacher_thresholds", torch.zeros(len(fprs)))

    def soft_rank(self, similarity: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """`sum_k sigmoid((s - tau_k) / T)` per pair (clamped at +-50 like the reference code)."""
        z = (similarity.unsqueeze(1) - thresholds.unsqueeze(0)) / self.temperature
        return torch.sigmoid(z.clamp(-50.0, 50.0)).sum(dim=1)

    def _rank_loss(self, s_sim: torch.Tensor, t_sim: torch.Tensor) -> torch.Tensor:
        if s_sim.numel() == 0:
            return s_sim.sum() * 0.0
        s_rank = self.soft_rank(s_sim, self.student_thresholds)
        t_rank = self.soft_rank(t_sim, self.teacher_thresholds)
        return (s_rank - t_rank).pow(2).mean()

    def _update_thresholds(self, s_neg_sorted: torch.Tensor, t_neg: torch.Tensor) -> None:
        count = s_neg_sorted.numel()
        if count == 0 or not self.training:
            return
        index = torch.tensor([min(count // inv, count - 1) for inv in self.inverse_fprs], device=t_neg.device)
        t_sorted = torch.sort(t_neg, descending=True).values
        m = self.momentum
        self.student_thresholds.mul_(1 - m).add_(m * s_neg_sorted.detach()[index])
        self.teacher_thresholds.mul_(1 - m).add_(m * t_sorted[index])

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = student.shape[0]
        s_all = cosine_matrix(student)
        with torch.no_grad():
            t_all = cosine_matrix(teacher.detach())
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=s_all.device), diagonal=1)
        s_pairs, t_pairs = s_all[upper], t_all[upper]
        if labels is None:
            positive = torch.zeros_like(s_pairs, dtype=torch.bool)
        else:
            labels = labels.view(-1)
            positive = (labels.unsqueeze(0) == labels.unsqueeze(1))[upper]
        s_neg, t_neg = s_pairs[~positive], t_pairs[~positive]
        s_neg_sorted, order = torch.sort(s_neg, descending=True)
        with torch.no_grad():
            self._update_thresholds(s_neg_sorted, t_neg)
        hardest = order[: self.topk]
        pos_loss = self._rank_loss(s_pairs[positive], t_pairs[positive])
        neg_loss = self._rank_loss(s_neg[hardest], t_neg[hardest])
        loss = self.pos_weight * pos_loss + self.neg_weight * neg_loss
        return loss, {"ekd_pos": pos_loss.detach(), "ekd_neg": neg_loss.detach()}


class RelationalTerms(nn.Module):
    """The batch-relation terms of the distillation objective, on the embeddings:
    `similarity_weight * L_sp(e_s, e_t) + ekd_weight * L_ekd(e_s, e_t, labels)`.

    `use_labels=False` (training with --no-labels) makes EKD treat every pair as a negative.
    """

    def __init__(self, *, similarity_weight: float = 0.0, ekd_weight: float = 0.0, use_labels: bool = True,
                 ekd_fprs=EKD_FPRS, ekd_topk: int = EKD_TOPK, ekd_temperature: float = EKD_TEMPERATURE):
        super().__init__()
        self.similarity_weight = float(similarity_weight)
        self.ekd_weight = float(ekd_weight)
        self.use_labels = bool(use_labels)
        self.ekd = EKDLoss(ekd_fprs, ekd_topk, ekd_temperature) if self.ekd_weight else None

    @property
    def active(self) -> bool:
        return bool(self.similarity_weight) or self.ekd is not None

    def forward(self, student_embedding: torch.Tensor, teacher_embedding: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Cosines near +-1 need full precision: never under bf16/fp16 autocast.
        with torch.autocast(device_type=student_embedding.device.type, enabled=False):
            total = student_embedding.float().sum() * 0.0
            terms: dict[str, torch.Tensor] = {}
            if self.similarity_weight:
                value = similarity_preserving_loss(student_embedding, teacher_embedding)
                total = total + self.similarity_weight * value
                terms["distill_sim"] = value.detach()
            if self.ekd is not None:
                value, logs = self.ekd(student_embedding, teacher_embedding, labels if self.use_labels else None)
                total = total + self.ekd_weight * value
                terms["distill_ekd"] = value.detach()
                terms.update(logs)
        return total, terms


def build_relational(config) -> RelationalTerms | None:
    """The relational terms a DistillConfig asks for, or None when both are off."""
    terms = RelationalTerms(similarity_weight=config.similarity_weight, ekd_weight=config.ekd_weight,
                            use_labels=config.labels, ekd_fprs=config.ekd_fprs, ekd_topk=config.ekd_topk,
                            ekd_temperature=config.ekd_temperature)
    return terms if terms.active else None
