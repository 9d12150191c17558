"""Distillation throughput through the real Trainer on one CUDA GPU, against the teacher-forward bound.

    python benchmarks/gpu_distill.py                # MobileFaceNet <- r100, 112 px, bf16, batch 128
    python benchmarks/gpu_distill.py --smoke        # tiny sizes on CPU: checks the script runs

Measured in one run, one after the other (each after its own warm-up window):
  inline   `Trainer.fit` of a DistillTask: teacher forward (prepared: BN folded, bf16 weights,
           compiled), student forward/backward, stage + embedding angular losses, a 93k-class
           ArcFace head sampling 10% of its centres, SGD; images from an in-memory uint8 dataset
           through the DataLoader (so decoding does not limit it);
  cached   the same with the teacher outputs cached first (embeddings only, so no stage losses:
           the cache of the four stage maps of every image would not fit in memory);
  bound    the prepared teacher's forward alone on the same batch: no inline distill step can be
           faster than this.
img/s is the median over the logged windows after the first (which includes warm-up and
compilation); peak memory is torch.cuda.max_memory_allocated during that variant.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class MemoryFaces:
    """Random uint8 faces held in memory, with the FaceDataset interface the trainer uses."""

    def __init__(self, count: int, size: int, num_classes: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images = torch.from_numpy(rng.integers(0, 256, (count, 3, size, size), dtype=np.uint8))
        self.labels = rng.integers(0, num_classes, count).astype(np.int64)
        self.num_classes, self.mean, self.std, self.spec = num_classes, 127.5, 127.5, f"memory:{count}"

    def __len__(self) -> int:
        return len(self.images)

    def item_uint8(self, index: int):
        return self.images[index], int(self.labels[index]), int(index)

    def __getitem__(self, index: int):
        return (self.images[index].float() - 127.5) / 127.5, int(self.labels[index]), int(index)


def build_task(args, dataset, cache_dir: Path | None):
    from shrinkcli.distill import CacheRequest, DistillTask
    from shrinkcli.losses.distill import DistillCriterion
    from shrinkcli.losses.margin import MarginHead
    from shrinkcli.models import create_model

    torch.manual_seed(0)
    teacher = create_model(args.teacher, embedding_size=512, input_size=args.input_size, width=args.teacher_width)
    student = create_model("mobilefacenet", embedding_size=512, input_size=args.input_size, width=args.student_width)
    cached = cache_dir is not None
    criterion = DistillCriterion(student_channels=list(student.stage_channels),
                                 teacher_channels=list(teacher.stage_channels), student_embedding=512,
                                 teacher_embedding=512, stage_loss="none" if cached else "angular")
    head = MarginHead(512, args.classes, kind="arcface", sample_rate=args.sample_rate)
    request = None
    if cached:
        request = CacheRequest(directory=cache_dir, key="bench", dataset=dataset, flips=2, with_stages=False,
                               batch_size=args.batch, workers=0)
    return DistillTask(student=student, teacher=teacher, criterion=criterion, head=head, cache=request,
                       compile_teacher=args.compile)


def train(args, dataset, cache_dir: Path | None) -> dict:
    from shrinkcli.config import TrainConfig
    from shrinkcli.engine import Trainer

    task = build_task(args, dataset, cache_dir)
    config = TrainConfig(device=args.device, amp=args.amp, batch_size=args.batch, epochs=10**6,
                         max_steps=args.steps, log_every=args.log_every, workers=args.workers,
                         input_size=args.input_size, lr=0.1, warmup_epochs=0.0, seed=0)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(config, None, task, dataset)
    trainer.fit()
    speeds = trainer.throughput[1:] or trainer.throughput
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    return {"img_per_s": statistics.median(speeds), "peak_gib": peak, "task": task,
            "teacher_steps": task.teacher_steps}


def teacher_bound(args, task, dataset) -> dict:
    """The prepared teacher's forward alone (what the inline run used), same batch and dtype."""
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    images = (dataset.images[:args.batch].to(args.device).float() - 127.5) / 127.5
    images = images.contiguous(memory_format=torch.channels_last)
    with_stages = task.criterion.needs_teacher_stages

    def forward():
        task.teacher_outputs(images, with_stages=with_stages)

    for _ in range(3):
        forward()
    samples = []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.log_every):
            forward()
        if cuda:
            torch.cuda.synchronize()
        samples.append(args.log_every * args.batch / (time.perf_counter() - started))
    return {"img_per_s": statistics.median(samples),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="r100")
    parser.add_argument("--teacher-width", type=float, default=1.0)
    parser.add_argument("--student-width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--classes", type=int, default=93000)
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--images", type=int, default=128 * 64, help="in-memory dataset size")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="timed samples of the teacher bound")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--amp", default="bf16")
    parser.add_argument("--compile", default="auto", help="compile_teacher: auto, on or off")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (the test suite runs this)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.teacher, args.teacher_width, args.student_width, args.batch, args.input_size = "r18", 0.125, 0.25, 8, 32
        args.classes, args.images, args.steps, args.log_every, args.repeats = 50, 32, 6, 2, 2
        args.workers, args.amp, args.device, args.compile = 0, "off", "cpu", "off"
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_distill.py needs a CUDA GPU (use --smoke on CPU)")
    dataset = MemoryFaces(args.images, args.input_size, args.classes)
    inline = train(args, dataset, None)
    bound = teacher_bound(args, inline["task"], dataset)
    with tempfile.TemporaryDirectory() as tmp:
        cached = train(args, dataset, Path(tmp) / "cache")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows = [{"variant": "inline distill (Trainer)", **inline}, {"variant": "cached distill (Trainer)", **cached},
            {"variant": "teacher forward only (bound)", **bound}]
    print(f"## Distill throughput ({name}, torch {torch.__version__})\n")
    print(f"mobilefacenet <- {args.teacher}, {args.input_size} px, {args.amp}, batch {args.batch}, "
          f"{args.classes}-class arcface head sampling {args.sample_rate:g}, {args.steps} steps, "
          f"compile_teacher={args.compile}\n")
    print("| variant | img/s | vs inline | vs bound | peak GPU memory |\n|---|---|---|---|---|")
    for row in rows:
        memory = f"{row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else "n/a"
        print(f"| {row['variant']} | {row['img_per_s']:.0f} | {row['img_per_s'] / inline['img_per_s']:.2f} "
              f"| {row['img_per_s'] / bound['img_per_s']:.2f} | {memory} |")
    return [{k: v for k, v in row.items() if k != "task"} for row in rows]


if __name__ == "__main__":
    main()
