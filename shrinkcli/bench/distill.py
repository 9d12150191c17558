"""Suite `distill`: the training engine's overhead on a full distillation step.

A: images/s of `Trainer(...).fit()` with a `DistillTask` (frozen teacher, student, adapters, margin
head), data already decoded in memory, logging at the default interval (and at the end of every fit call), no run directory.
B: images/s of the bare model compute on the same tensors: teacher forward under no_grad, student
forward, the same losses, backward and the same optimizer step -- no loader, flip, clipping, loss
sync, schedule or logging. Target: A/B >= 0.95 (engine overhead <= 5%).
Models as the CPU benchmark (docs/benchmarks.md): 64 px, IResNet-18 width 0.5 teacher,
MobileFaceNet student, batch 64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shrinkcli.bench.timing import interleaved_rates, ratio_row

SUITE = "distill"


@dataclass(frozen=True)
class DistillSettings:
    teacher: str = "r18"
    teacher_width: float = 0.5
    student: str = "mobilefacenet"
    input_size: int = 64
    batch_size: int = 64
    steps: int = 4             # optimizer steps per timed sample
    repeats: int = 5
    identities: int = 32

    @classmethod
    def for_run(cls, quick: bool) -> "DistillSettings":
        return cls(input_size=32, batch_size=16, steps=2, repeats=2, identities=8) if quick else cls()

    def describe(self) -> str:
        return (f"{self.teacher} w{self.teacher_width:g} -> {self.student}, {self.input_size} px, batch "
                f"{self.batch_size}, {self.steps} steps x {self.repeats} repeats, fp32 channels_last, "
                f"{torch.get_num_threads()} torch threads")


class InMemoryFaces(torch.utils.data.Dataset):
    """Pre-decoded images: the dataset contract (`ds[i] -> (image, label, index)`) without decoding."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index]), int(index)


def decoded_faces(settings: DistillSettings, images_needed: int) -> InMemoryFaces:
    """Synthetic faces decoded once at the benchmark's input size."""
    from shrinkcli.data import open_dataset

    per_identity = max(2, -(-images_needed // settings.identities))
    source = open_dataset(f"synthetic:{settings.identities}:{per_identity}:0", input_size=settings.input_size)
    count = min(len(source), images_needed)
    images = torch.stack([source[i][0] for i in range(count)])
    return InMemoryFaces(images, source.labels[:count])


def build_task(settings: DistillSettings, num_classes: int):
    """The DistillTask the `shrink distill` stage would build for these models (angular losses, labels)."""
    from shrinkcli.distill import DistillTask
    from shrinkcli.losses.distill import DistillCriterion
    from shrinkcli.losses.margin import MarginHead
    from shrinkcli.models import create_model

    torch.manual_seed(0)
    teacher = create_model(settings.teacher, embedding_size=512, input_size=settings.input_size,
                           width=settings.teacher_width)
    student = create_model(settings.student, embedding_size=512, input_size=settings.input_size)
    criterion = DistillCriterion(student_channels=list(student.stage_channels),
                                 teacher_channels=list(teacher.stage_channels),
                                 student_embedding=student.embedding_size, teacher_embedding=teacher.embedding_size)
    head = MarginHead(student.embedding_size, num_classes, kind="arcface")
    return DistillTask(student=student, teacher=teacher, criterion=criterion, head=head)


def train_config(settings: DistillSettings):
    from shrinkcli.config import DistillConfig

    return DistillConfig(input_size=settings.input_size, batch_size=settings.batch_size, workers=0,
                         epochs=10_000, log_every=10, device="cpu", amp="off", channels_last=True, seed=0)


class StepRunners:
    """The engine path and the bare path over the same modules and tensors."""

    def __init__(self, settings: DistillSettings):
        from shrinkcli.engine import Trainer
        from shrinkcli.engine.optim import build_optimizer

        self.settings = settings
        self.dataset = decoded_faces(settings, settings.batch_size * settings.steps * 2)
        self.task = build_task(settings, self.dataset.num_classes)
        self.config = train_config(settings)
        self.trainer = Trainer(self.config, None, self.task, self.dataset)
        self.task.on_start(self.trainer)
        self.optimizer = build_optimizer(self.config, self.trainer.modules.values())
        order = torch.arange(settings.batch_size * settings.steps) % len(self.dataset)
        self.batches = [(self.dataset.images[idx].contiguous(memory_format=torch.channels_last),
                         torch.as_tensor(self.dataset.labels[idx.numpy()]))
                        for idx in order.split(settings.batch_size)]

    def engine(self) -> int:
        """`settings.steps` optimizer steps through Trainer.fit (loader, flip, logging, clipping...)."""
        self.config.max_steps = self.trainer.step + self.settings.steps
        self.trainer.fit()
        return self.settings.steps * self.settings.batch_size

    def bare_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        task = self.task
        with torch.no_grad():
            teacher_out = task.teacher.forward_features(images)
        out = task.student.forward_features(images)
        loss, _ = task.criterion(out.stage_maps, out.embedding, teacher_out.stage_maps, teacher_out.embedding)
        loss = loss + task.head(out.embedding, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def bare(self) -> int:
        for module in self.trainer.modules.values():
            module.train()
        for images, labels in self.batches:
            self.bare_step(images, labels)
        return len(self.batches) * self.settings.batch_size


def profile_step(runners: StepRunners, top: int = 8) -> list[dict[str, Any]]:
    """The operators that dominate one bare distill step (torch.profiler, self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    images, labels = runners.batches[0]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runners.bare_step(images, labels)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1),
             "share_%": round(100 * e.self_cpu_time_total / total, 1), "calls": e.count}
            for e in events[:top]]


def run(quick: bool = False, **_: Any) -> dict[str, Any]:
    from shrinkcli import log

    settings = DistillSettings.for_run(quick)
    runners = StepRunners(settings)
    rates = interleaved_rates({"engine": runners.engine, "bare": runners.bare},
                              repeats=settings.repeats, warmup=1)
    ratio = rates["engine"] / rates["bare"]
    log.info(f"bench distill: engine {rates['engine']:.1f} img/s, bare {rates['bare']:.1f} img/s")
    row = ratio_row(SUITE, "distill step: engine vs bare compute (>= 0.95 means overhead <= 5%)",
                    a="Trainer + DistillTask", a_value=rates["engine"], b="bare model compute",
                    b_value=rates["bare"], unit="img/s", ratio=ratio, target=0.95, settings=settings.describe())
    tables = {} if quick else {"distill step profile (one bare step, top ops by self CPU time)": profile_step(runners)}
    return {"rows": [row], "tables": tables, "consumption_img_s": rates["engine"]}

