"""Margin softmax heads for face recognition: ArcFace and CosFace, with PartialFC-style sampling.

ArcFace (Deng et al. 2019): the target logit is s*cos(theta + m) (default s=64, m=0.5). We use the
standard, easy-margin-free formulation: where theta + m would pass pi, cos(theta + m) stops being
monotonic in theta, so the target logit falls back to cos(theta) - m*sin(m) there.
CosFace (Wang et al. 2018): the target logit is s*(cos(theta) - m) (default m=0.35).

PartialFC (An et al. 2021): with `sample_rate < 1` each step scores the batch only against the
class centres of its own labels plus random negative centres, up to `sample_rate * num_classes`;
million-class heads then cost a fraction of the memory and compute per step. Once the engine binds
the optimizer (`bind_optimizer`), the update is row-sparse too, as in the PartialFC paper: for the
step the `weight` parameter holds only the sampled rows and the optimizer's state only theirs, so
SGD's momentum and weight decay (AdamW's moments) touch k rows, not C; the rows are written back
into the full matrix before the next forward pass and before a checkpoint (`flush_rows`), which
then looks exactly like a dense one. Unsampled rows keep their centre and momentum unchanged
that step (dense PartialFC, arcface_torch's v2, would decay and move them).
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


class _CentreCosines(torch.autograd.Function):
    """cos[b, j] = (u_b . w_j) / |w_j| for unit embeddings u and raw centres w, with the backward
    written out: d/dw_j = sum_b g_bj (u_b / |w_j| - cos_bj w_j / |w_j|^2), one matmul plus one
    pass over the centres (autograd through a normalised K x D copy makes about eight)."""

    @staticmethod
    def forward(ctx, units, centres):
        inverse = centres.norm(dim=1).clamp_min(1e-12).reciprocal()
        cosine = (units @ centres.t()) * inverse
        ctx.save_for_backward(units, centres, inverse, cosine)
        return cosine

    @staticmethod
    def backward(ctx, grad):
        units, centres, inverse, cosine = ctx.saved_tensors
        scaled = grad * inverse
        grad_units = scaled @ centres if ctx.needs_input_grad[0] else None
        grad_centres = None
        if ctx.needs_input_grad[1]:
            radial = (grad * cosine).sum(dim=0) * inverse * inverse
            grad_centres = torch.addcmul(scaled.t() @ units, centres, radial.unsqueeze(1), value=-1.0)
        return grad_units, grad_centres


def centre_cosines(embeddings: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """`[B, D] x [K, D] -> [B, K]` cosines, clamped to [-1, 1], in float32 (see _CentreCosines)."""
    units = F.normalize(embeddings.float(), dim=1)
    return _CentreCosines.apply(units, centres.float()).clamp(-1.0, 1.0)


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
        self._optimizer: torch.optim.Optimizer | None = None
        self._full: tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None = None

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Update only the sampled rows from now on (the engine calls this once the optimizer is built)."""
        weight = self.weight
        if isinstance(weight, nn.Parameter) and any(p is weight for g in optimizer.param_groups for p in g["params"]):
            self._optimizer = optimizer

    def _centres(self, chosen: torch.Tensor | None) -> torch.Tensor:
        """The centres scored this step: all of them, or the sampled rows (see the module docstring)."""
        self.flush_rows()
        if chosen is None:
            return self.weight
        if self._optimizer is None:
            return self.weight.index_select(0, chosen)
        weight, state = self.weight, self._optimizer.state[self.weight]
        full_state = {key: value for key, value in state.items()
                      if torch.is_tensor(value) and value.shape == weight.shape}
        with torch.no_grad():
            full = weight.data
            weight.data = full.index_select(0, chosen)
            for key, value in full_state.items():
                state[key] = value.index_select(0, chosen)
        self._full = (full, chosen, full_state)
        return weight

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.flush_rows()    # a state dict always holds the full matrix
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        self.flush_rows()    # loads into the full matrix, never into a step's sampled rows
        super()._load_from_state_dict(*args, **kwargs)

    def flush_rows(self) -> None:
        """Write the last step's rows and their optimizer state back into the full matrix."""
        if self._full is None:
            return
        (full, chosen, full_state), self._full = self._full, None
        weight, state = self.weight, self._optimizer.state[self.weight]
        with torch.no_grad():
            full.index_copy_(0, chosen, weight.data)
            for key, value in list(state.items()):
                if torch.is_tensor(value) and value.shape == weight.shape:
                    if key not in full_state:    # created by the optimizer's first step on these rows
                        full_state[key] = torch.zeros_like(full)
                    full_state[key].index_copy_(0, chosen, value)
                    state[key] = full_state[key]
            weight.data = full
            weight.grad = None

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
        weight = self._centres(chosen)
        # Margins on cosines near +-1 need full precision: never run this part in bf16/fp16.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cosine = centre_cosines(embeddings, weight)
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
