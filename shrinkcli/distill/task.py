"""DistillTask: the training engine's task for ShrinkTeaNet distillation.

Trainable: the student backbone, the stage/embedding adapters and (with labels) a margin head.
The teacher is frozen: eval mode (BN running statistics, no dropout), `requires_grad=False` on
every parameter, evaluated under `torch.no_grad()` (not `inference_mode`: the losses save the
teacher's tensors for the student's backward pass, which inference tensors forbid), in the run's
autocast dtype (`amp`) and channels_last when the engine uses it. It runs as prepared by
`shrinkcli.models.freeze.prepare_teacher` (BN folded; on CUDA weights cast once to the autocast
dtype and the forward compiled, `compile_teacher`); stage maps are computed only when a stage
loss (or the cache) needs them and stay in the compute dtype (the losses upcast).

Objective per step:
`L = L_margin (with labels) + embed_weight * L(e_s, e_t) + sum_k stage_weights[k] * L(adapt_k(s_k), t_k)`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrinkcli.distill.cache import TeacherCache, open_or_build
from shrinkcli.errors import BadInputError
from shrinkcli.losses.distill import DistillCriterion


@dataclass
class CacheRequest:
    """Where and under which key to cache teacher outputs (see shrinkcli.distill.cache)."""

    directory: Path | None       # None on non-main ranks: rank 0's directory is used
    key: str
    dataset: Any
    flips: int = 2
    with_stages: bool = False
    batch_size: int = 64
    workers: int = 0
    stage_dtype: str = "float16"


class StudentStep(nn.Module):
    """Student forward + distillation terms as one module, so DDP sees every trainable tensor of a
    step (student and adapters) in a single forward call."""

    def __init__(self, student: nn.Module, criterion: DistillCriterion):
        super().__init__()
        self.student, self.criterion = student, criterion

    def forward(self, images, teacher_stages, teacher_embedding):
        out = self.student.forward_features(images)
        total, terms = self.criterion(out.stage_maps, out.embedding, teacher_stages, teacher_embedding)
        return total, terms, out.embedding


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


class DistillTask:
    """Implements the engine's TrainTask protocol for student <- teacher distillation."""

    def __init__(self, *, student: nn.Module, teacher: nn.Module, criterion: DistillCriterion,
                 head: nn.Module | None = None, cache: CacheRequest | None = None,
                 relational: nn.Module | None = None, compile_teacher: str = "auto"):
        self.student = student
        self.teacher = freeze(teacher)
        self.criterion = criterion
        self.head = head
        self.relational = relational    # batch-relation terms (SP, EKD) on the embeddings, or None
        self.cache_request = cache
        self.cache: TeacherCache | None = None
        self.device = torch.device("cpu")
        self.channels_last = False
        self.autocast_dtype: torch.dtype | None = None
        self.compile_teacher = compile_teacher
        self.prepared: nn.Module | None = None      # the teacher as run (see teacher_outputs)
        self.prepared_info: dict[str, Any] = {}
        self.teacher_steps = 0          # teacher forward passes made during training (0 when cached)
        criterion.freeze_unused_adapters()
        self.student_step: nn.Module = StudentStep(student, criterion)
        self.head_step = head

    def modules(self) -> dict[str, nn.Module]:
        # The backbone comes first: the engine saves it as the checkpoint's "model".
        modules: dict[str, nn.Module] = {"student": self.student, "adapters": self.criterion.adapters}
        if self.head is not None:
            modules["head"] = self.head
        if self.relational is not None and any(True for _ in self.relational.buffers()):
            modules["relational"] = self.relational     # EKD's moving thresholds: checkpointed
        return modules

    def distribute(self, wrap) -> None:
        self.student_step = wrap(self.student_step)
        # A head with fixed teacher centres and no adapter has nothing to all-reduce (and DDP refuses it).
        # A sharded head (learned centres under torchrun) is model-parallel: it stays out of DDP.
        if (self.head is not None and not getattr(self.head, "sharded", False)
                and any(p.requires_grad for p in self.head.parameters())):
            self.head_step = wrap(self.head)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def embedder(self) -> nn.Module:
        return self.student

    def on_start(self, trainer: Any) -> None:
        """Put the frozen teacher beside the student and fill the cache (one pass) if asked to."""
        self.device = torch.device(getattr(trainer, "device", "cpu"))
        self.channels_last = bool(getattr(getattr(trainer, "config", None), "channels_last", False))
        self.autocast_dtype = getattr(trainer, "autocast_dtype", None)
        self.teacher.to(self.device)
        if self.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        freeze(self.teacher)
        self.prepared = None            # prepared for this device, dtype and memory format
        self.prepare_teacher()
        if self.cache_request is not None and self.cache is None:
            # The pass must leave every RNG as it found it, or a cached run would diverge from an inline one.
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                self.cache = self._open_cache(trainer)
            self.cache.place(self.device)
        prepare = getattr(self.head, "prepare", None)
        if prepare is not None:     # teacher-mean centres: from the cache, or one teacher pass
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                prepare(self)

    def _open_cache(self, trainer: Any) -> TeacherCache:
        """All ranks build (each its slice) or reuse the cache in rank 0's directory."""
        from shrinkcli.engine import distributed as ddp

        request = self.cache_request
        is_main = bool(getattr(trainer, "is_main", True))
        directory, key = ddp.broadcast_object((str(request.directory), request.key) if is_main else None)
        if key != request.key:
            raise BadInputError("the processes of this run load different teachers or data (teacher cache keys differ)",
                                hint="give every rank the same --teacher file and --data")
        def teacher_fn(images):
            return self.teacher_outputs(images, with_stages=request.with_stages)

        return open_or_build(Path(directory), request.key, request.dataset, teacher_fn,
                             device=self.device, flips=request.flips, with_stages=request.with_stages,
                             batch_size=request.batch_size, workers=request.workers,
                             channels_last=self.channels_last, stage_dtype=request.stage_dtype)

    def prepare_teacher(self) -> nn.Module:
        """The frozen teacher as it runs here (built once, on the current device)."""
        if self.prepared is None:
            from shrinkcli.models.freeze import prepare_teacher

            self.prepared, self.prepared_info = prepare_teacher(
                self.teacher, device=self.device, autocast_dtype=self.autocast_dtype,
                channels_last=self.channels_last, compile=self.compile_teacher)
        return self.prepared

    def _autocast(self):
        if self.prepared_info.get("dtype", "float32") != "float32":
            # Weights and inputs already are in the compute dtype: autocast would only add casts.
            return torch.autocast(self.device.type, enabled=False)
        if self.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def teacher_outputs(self, images: torch.Tensor, with_stages: bool | None = None
                        ) -> tuple[list[torch.Tensor] | None, torch.Tensor]:
        """The frozen teacher's (stage maps in the compute dtype, or None when not needed; float32
        embedding), without autograd history."""
        if with_stages is None:
            with_stages = self.criterion.needs_teacher_stages
        if self.prepared is None:
            self.device = images.device
        prepared = self.prepare_teacher()
        if prepared.training:           # something called .train() on every module: undo it
            prepared.eval()
        with torch.no_grad(), self._autocast():
            stages, embedding = prepared(images, with_stages)
        return (list(stages) if with_stages else None), embedding.float()

    def loss(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
             flipped: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Any]]:
        needs_stages = self.criterion.needs_teacher_stages
        if not (self.criterion.needs_teacher or self.relational is not None):
            t_stages, t_emb = None, None
        elif self.cache is not None and (self.cache.has_stages or not needs_stages):
            t_stages, t_emb = self.cache.lookup(indices, flipped, device=images.device, with_stages=needs_stages)
        else:
            t_stages, t_emb = self.teacher_outputs(images)
            self.teacher_steps += 1
        total, terms, embedding = self.student_step(images, t_stages, t_emb)
        logs: dict[str, Any] = {"distill": total.detach()}
        if self.head is not None:
            margin = self.head_step(embedding, labels)
            total = total + margin
            logs["margin"] = margin.detach()
        if self.relational is not None:
            relation, relation_terms = self.relational(embedding, t_emb, labels)
            total = total + relation
            logs["distill"] = logs["distill"] + relation.detach()
            terms = {**terms, **relation_terms}
        logs.update(terms)
        return total, logs
