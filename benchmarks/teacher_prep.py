"""Teacher forward as distillation runs it: today's eager module vs the prepared (BN-folded) one.

    OMP_NUM_THREADS=1 python benchmarks/teacher_prep.py [--arch r100] [--batch 4] [--input-size 112]
                                                        [--repeats 5] [--compile] [--device cpu]

Side by side in one process, interleaved (the order rotates every round), warm-up round first,
median of the repeats: images/s of
  A  the teacher as loaded: eval mode, no_grad, channels_last, every BN unfolded;
  B  the prepared teacher with BN folded (`prepare_teacher(fold=True)`), weights cast once on
     CUDA, not compiled (on CPU `prepare_teacher` keeps the module as loaded, so A is its default);
  C  (with --compile) B under torch.compile.
Also prints the smallest cosine between A's and B's embeddings and the largest relative
difference of the four stage maps. BN statistics are randomised first, so the fold is not trivial.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def randomise_bn(model: torch.nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) * 0.2 + 0.2)  # keeps deep nets finite
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def main() -> None:
    from shrinkcli.models import create_model
    from shrinkcli.models.freeze import prepare_teacher

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="r100")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="forward passes per timed sample")
    parser.add_argument("--compile", action="store_true", help="also time the prepared teacher under torch.compile")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher = create_model(args.arch, embedding_size=512, input_size=args.input_size)
    randomise_bn(teacher)
    teacher.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    eager_prepared, info = prepare_teacher(teacher, device=device, autocast_dtype=dtype, channels_last=True, compile=False,
                                            fold=True)
    variants = {"as loaded": lambda x: teacher.forward_features(x),
                "folded": lambda x: eager_prepared(x, True)}
    if args.compile:
        compiled, _ = prepare_teacher(teacher, device=device, autocast_dtype=dtype, channels_last=True, compile=True, fold=True)
        variants["folded + compiled"] = lambda x: compiled(x, True)
    images = torch.randn(args.batch, 3, args.input_size, args.input_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = teacher.forward_features(images)
        stages, emb = eager_prepared(images, True)
    cosine = float(torch.nn.functional.cosine_similarity(ref.embedding.float(), emb.float()).min())
    stage_diff = max(float((a - b.float()).abs().max() / a.abs().max()) for a, b in zip(ref.stage_maps, stages))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.repeats + 1):        # round 0 warms up (and compiles)
        names = list(variants)
        names = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in names:
            with torch.no_grad():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(args.steps):
                    variants[name](images)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            if round_index:
                samples[name].append(args.steps * args.batch / (time.perf_counter() - started))
    rates = {name: statistics.median(values) for name, values in samples.items()}
    base = rates["as loaded"]
    print(f"teacher {args.arch} at {args.input_size} px, batch {args.batch}, {device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {args.steps} passes x {args.repeats} repeats (median); "
          f"{info['folded_bn']} BNs folded\n")
    print("| teacher forward | img/s | vs as loaded |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.2f} | {rate / base:.2f}x |")
    print(f"\nembedding cosine (min) {cosine:.8f}; stage maps max relative difference {stage_diff:.2e}")


if __name__ == "__main__":
    main()
