"""Bare distill step on one CUDA GPU: bf16 + channels_last vs fp32, and vs the teacher-forward bound.

    python benchmarks/gpu_precision.py [--teacher r100] [--batch 256] [--steps 20] [--repeats 5]

A hand-written loop (no Trainer, the teacher as loaded): it isolates what the precision and the
memory format alone do. The acceptance numbers come from benchmarks/gpu_distill.py (the Trainer).

Side by side in one run (interleaved, warm-up first, median of the repeats), images/s of:
  A  full distill step, bf16 autocast + channels_last (teacher forward under no_grad, student
     forward/backward, stage + embedding angular losses, margin head, SGD step);
  B  the same step in fp32, contiguous (NCHW) tensors;
  C  teacher forward only, bf16 + channels_last: an upper bound for any distill step that runs
     the teacher inline (a cached teacher removes this cost entirely).
Prints a Markdown table with A/B and A/C.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def build(teacher_arch: str, input_size: int, num_classes: int, device: torch.device):
    from shrinkcli.distill import DistillTask
    from shrinkcli.losses.distill import DistillCriterion
    from shrinkcli.losses.margin import MarginHead
    from shrinkcli.models import create_model

    torch.manual_seed(0)
    teacher = create_model(teacher_arch, embedding_size=512, input_size=input_size)
    student = create_model("mobilefacenet", embedding_size=512, input_size=input_size)
    criterion = DistillCriterion(student_channels=list(student.stage_channels), teacher_channels=list(teacher.stage_channels),
                                 student_embedding=512, teacher_embedding=512)
    head = MarginHead(512, num_classes, kind="arcface")
    task = DistillTask(student=student, teacher=teacher, criterion=criterion, head=head)
    for module in (teacher, student, criterion, head):
        module.to(device)
    params = [p for m in (student, criterion, head) for p in m.parameters() if p.requires_grad]
    return task, torch.optim.SGD(params, lr=0.01, momentum=0.9)


def make_step(task, optimizer, images, labels, *, bf16: bool, channels_last: bool, teacher_only: bool = False):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for module in (task.teacher, task.student, task.criterion):
        module.to(memory_format=memory_format)
    images = images.contiguous(memory_format=memory_format)
    device_type = images.device.type
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step() -> None:
        with autocast():
            with torch.no_grad():
                t = task.teacher.forward_features(images)
            if teacher_only:
                return
            out = task.student.forward_features(images)
            loss, _ = task.criterion(out.stage_maps, out.embedding, [s.float() for s in t.stage_maps], t.embedding.float())
            loss = loss + task.head(out.embedding, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="r100", help="r90 or r100 (any registered teacher works)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed sample")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only checks that the script runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    task, optimizer = build(args.teacher, args.input_size, 1000, device)
    task.teacher.eval()
    images = torch.randn(args.batch, 3, args.input_size, args.input_size, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    variants = {"bf16 + channels_last": dict(bf16=True, channels_last=True),
                "fp32 NCHW": dict(bf16=False, channels_last=False),
                "teacher forward only (bf16 + channels_last)": dict(bf16=True, channels_last=True, teacher_only=True)}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.repeats + 1):          # round 0 is the warm-up
        names = list(variants)
        names = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in names:
            step = make_step(task, optimizer, images, labels, **variants[name])
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_index:
                samples[name].append(args.steps * args.batch / (time.perf_counter() - started))
    rates = {name: statistics.median(values) for name, values in samples.items()}
    fast, slow, bound = rates.values()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"## GPU distill throughput ({name}, torch {torch.__version__})\n")
    print(f"teacher {args.teacher} -> mobilefacenet, {args.input_size} px, batch {args.batch}, "
          f"{args.steps} steps x {args.repeats} repeats (median)\n")
    print("| variant | img/s |\n|---|---|")
    for variant, rate in rates.items():
        print(f"| {variant} | {rate:.0f} |")
    print(f"\nbf16 + channels_last vs fp32: {fast / slow:.2f}x; "
          f"distill step vs teacher-forward bound: {fast / bound:.2f} of the bound")


if __name__ == "__main__":
    main()
