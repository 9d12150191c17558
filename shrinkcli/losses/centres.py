"""Teacher-centre margin head: the student's margin loss scores it against fixed class centres
taken from the teacher's embedding space (ProxylessKD, Shi et al. 2020, "ProxylessKD: Direct
Knowledge Distillation with Inherited Classifier for Face Recognition"; the fixed-centre member
of the family AdaDistill, Boutros et al. ECCV 2024, extends with adaptive centres).

`L = CE(s * margin(cos(A(e_s), w_y)), y)` with `w_c` frozen:
- `teacher-classifier`: `w_c` are the rows of the teacher run's own margin head (its
  weights/last.pt holds them under module "head"), usable when the teacher was trained on the same
  data spec with the same identities;
- `teacher-mean`: `w_c = normalise(mean_{i: y_i = c} normalise(e_t^i))`, the mean normalised teacher
  embedding of each identity over the training images (and their mirrors when flips are on),
  computed once before training: from the teacher cache when there is one, else in one teacher pass;
- `teacher`: the classifier when the teacher run has a usable one, else the means.

`A` is the identity when student and teacher embeddings have the same size, else a learned
bias-free linear map `D_s -> D_t` owned by the head (trained with the student, never exported).
PartialFC sampling (`sample_rate < 1`) works as with learned centres: it selects rows of `w`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shrinkcli import log
from shrinkcli.errors import BadInputError
from shrinkcli.losses.margin import MarginHead

class TeacherCentreHead(MarginHead):
    """A MarginHead whose centres are a frozen buffer in the teacher's space, plus an adapter."""

    def __init__(self, student_embedding: int, teacher_embedding: int, num_classes: int, *,
                 kind: str = "arcface", margin: float | None = None, scale: float = 64.0,
                 sample_rate: float = 1.0):
        super().__init__(teacher_embedding, num_classes, kind=kind, margin=margin, scale=scale,
                         sample_rate=sample_rate)
        del self.weight     # the learned centres of MarginHead become a fixed buffer of the same name
        self.register_buffer("weight", torch.zeros(num_classes, teacher_embedding))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))
        self.adapter: nn.Module = nn.Identity()
        if student_embedding != teacher_embedding:
            self.adapter = nn.Linear(student_embedding, teacher_embedding, bias=False)
        self.source = "unset"
        self._ready = False
        self._pending_mean: Any = None     # (dataset, flips, batch_size, workers) for `prepare`
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_ready())

    def _sync_ready(self) -> None:
        self._ready = bool(self.filled)

    def set_centres(self, centres: torch.Tensor, source: str) -> None:
        if tuple(centres.shape) != tuple(self.weight.shape):
            raise BadInputError(f"teacher centres have shape {tuple(centres.shape)}, the head needs "
                                f"{tuple(self.weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(centres.to(self.weight.device, torch.float32))
            self.filled.fill_(True)
        self.source, self._ready = source, True

    def prepare(self, task: Any) -> None:
        """Fill the mean-embedding centres before the first step (no-op when already filled:
        the classifier source, or a resumed run whose checkpoint holds them)."""
        if self._ready:
            return
        if self._pending_mean is None:
            raise RuntimeError("teacher centres were neither loaded nor scheduled for computation")
        dataset, flips, batch_size, workers = self._pending_mean
        labels = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.long)
        sums = CentreSums(self.num_classes, self.embedding_size)
        cache = getattr(task, "cache", None)
        if cache is not None:
            # [flips, N, D] float32 (a tensor or a memory-mapped array): read in chunks, never whole
            for flip in range(cache.flips):
                for start in range(0, len(labels), CHUNK):
                    block = np.asarray(cache.embeddings[flip, start:start + CHUNK], dtype=np.float32)
                    sums.add(torch.from_numpy(np.array(block)), labels[start:start + CHUNK])
        else:
            log.info(f"teacher centres: one teacher pass over {len(dataset)} images x {flips} flip(s)")
            teacher_embedding_pass(dataset, task.teacher_outputs, sums, device=task.device, flips=flips,
                                   batch_size=batch_size, workers=workers, channels_last=task.channels_last)
        centres = sums.centres()
        self.set_centres(centres, "teacher-mean")
        log.info(f"teacher centres: mean normalised teacher embedding of {self.num_classes} identities")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self._ready:
            raise RuntimeError("teacher centres are not computed yet (DistillTask.on_start does it)")
        return super().forward(self.adapter(embeddings), labels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, centres={self.source} (fixed)"


CHUNK = 65536      # cached embeddings read per block when averaging (a million-image cache is GBs)


class CentreSums:
    """Running per-identity sums of normalised embeddings -> unit mean centres."""

    def __init__(self, num_classes: int, dim: int):
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float32)
        self.counts = torch.zeros(num_classes, dtype=torch.float32)

    def add(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        e = F.normalize(embeddings.detach().float().cpu(), dim=1, eps=1e-8)
        labels = labels.detach().long().cpu()
        self.sums.index_add_(0, labels, e)
        self.counts.index_add_(0, labels, torch.ones(len(labels)))

    def centres(self) -> torch.Tensor:
        """`[C, D]` unit centres; an identity without images stays 0."""
        return F.normalize(self.sums / self.counts.clamp_min(1).unsqueeze(1), dim=1, eps=1e-8)


def mean_embedding_centres(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`[M, D]` embeddings and `[M]` labels -> `[C, D]` unit centres (a class without images stays 0)."""
    sums = CentreSums(num_classes, embeddings.shape[1])
    sums.add(embeddings, labels)
    return sums.centres()


def teacher_embedding_pass(dataset: Any, teacher_fn, sums: CentreSums, *, device: torch.device, flips: int,
                           batch_size: int, workers: int = 0, channels_last: bool = False) -> None:
    """Add the teacher embedding of every image (and of its mirror when flips == 2) to `sums`."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    seen = 0
    for images, labels, _indices in loader:
        images = images.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        for flip in range(flips):
            _stages, emb = teacher_fn(images if flip == 0 else torch.flip(images, dims=[3]))
            sums.add(emb, torch.as_tensor(labels))
        seen += len(images)
    if seen == 0:
        raise BadInputError("cannot compute teacher centres of an empty dataset", hint="check --data")


def find_teacher_checkpoint(teacher_path: Path, teacher_run_dir: Path | None) -> Path | None:
    """The training checkpoint that goes with a teacher artifact, if any."""
    teacher_path = Path(teacher_path)
    if teacher_path.suffix == ".pt":
        return teacher_path
    for run_dir in (teacher_run_dir, teacher_path.parent):
        if run_dir is not None and (Path(run_dir) / "weights" / "last.pt").is_file():
            return Path(run_dir) / "weights" / "last.pt"
    return None


def teacher_classifier(teacher_path: Path, teacher_run_dir: Path | None, *, data_spec: str, num_classes: int,
                       embedding_size: int) -> tuple[torch.Tensor | None, str]:
    """(the teacher's class centres `[C, D_t]`, "") when its run has a head trained on the same
    data, else (None, why not)."""
    from shrinkcli.engine.checkpoint import load_checkpoint

    path = find_teacher_checkpoint(teacher_path, teacher_run_dir)
    if path is None:
        return None, f"no training checkpoint beside {teacher_path} (an imported or bare teacher)"
    try:
        state = load_checkpoint(path)
    except BadInputError as exc:
        return None, f"{path} is not usable: {exc}"
    weight = (state.get("modules") or {}).get("head", {}).get("weight")
    if weight is None:
        return None, f"{path} holds no margin head"
    trained_on = (state.get("config") or {}).get("data")
    if str(trained_on) != str(data_spec):
        return None, f"the teacher's head was trained on {trained_on!r}, not on {data_spec!r}"
    if tuple(weight.shape) != (num_classes, embedding_size):
        return None, (f"the teacher's head has shape {tuple(weight.shape)}, the data needs "
                      f"({num_classes}, {embedding_size})")
    return weight.float(), ""


def build_margin_head(config: Any, *, student_embedding: int, teacher_embedding: int, dataset: Any,
                      teacher_path: Path | None = None, teacher_run_dir: Path | None = None) -> MarginHead:
    """The margin head a DistillConfig asks for: learned centres, or fixed teacher centres."""
    options = dict(kind=config.head, margin=config.margin, scale=config.scale, sample_rate=config.sample_rate)
    source = getattr(config, "head_centres", "learned")
    if source == "learned":
        from shrinkcli.losses.partial_fc import margin_head

        return margin_head(student_embedding, dataset.num_classes, **options)  # sharded under torchrun
    head = TeacherCentreHead(student_embedding, teacher_embedding, dataset.num_classes, **options)
    if student_embedding != teacher_embedding:
        log.info(f"teacher centres: a linear adapter maps the {student_embedding}-d student embedding into the "
                 f"{teacher_embedding}-d teacher space for the margin loss (not exported)")
    if source in ("teacher", "teacher-classifier"):
        weight, why = (None, "no teacher artifact given") if teacher_path is None else teacher_classifier(
            teacher_path, teacher_run_dir, data_spec=str(config.data), num_classes=dataset.num_classes,
            embedding_size=teacher_embedding)
        if weight is not None:
            head.set_centres(weight, "teacher-classifier")
            log.info("teacher centres: the teacher's own classifier (ProxylessKD)")
            return head
        if source == "teacher-classifier":
            raise BadInputError(f"head_centres=teacher-classifier: {why}",
                                hint="use head_centres=teacher-mean (mean teacher embedding per identity)")
        log.info(f"teacher centres: {why}; using the mean teacher embedding per identity")
    head._pending_mean = (dataset, 2 if config.flip else 1, config.batch_size, max(0, config.workers))
    return head
