"""Training step with shrink's PReLU vs PyTorch's nn.PReLU kernel, side by side.

    OMP_NUM_THREADS=1 python benchmarks/prelu_backward.py [--batch 32] [--repeats 5]

For each model and input size: images/s of one forward + backward (channels_last, fp32, CPU) with
`shrinkcli.models.prelu.PReLU` (vectorised backward) and with the same modules running
`torch.nn.functional.prelu` (PyTorch's own backward), interleaved, median of the repeats; and the
largest relative difference between the two runs' parameter gradients.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from shrinkcli.bench.timing import interleaved_rates
from shrinkcli.models import create_model
from shrinkcli.models.prelu import PReLU


def torch_kernel(module: PReLU, x: torch.Tensor) -> torch.Tensor:
    return F.prelu(x, module.weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| model | px | nn.PReLU img/s | shrink PReLU img/s | speed-up | max rel. grad diff |\n|---|---|---|---|---|---|")
    for arch, size in (("mobilefacenet", 64), ("mobilefacenet", 112), ("r18", 64)):
        torch.manual_seed(0)
        model = create_model(arch, embedding_size=512, input_size=size).to(memory_format=torch.channels_last).train()
        images = torch.randn(args.batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        prelus = [m for m in model.modules() if isinstance(m, PReLU)]

        def step(use_torch_kernel: bool):
            def run() -> int:
                for module in prelus:   # an instance attribute shadows the class's forward
                    if use_torch_kernel:
                        module.forward = torch_kernel.__get__(module)
                    else:
                        module.__dict__.pop("forward", None)
                model.zero_grad()
                model(images).pow(2).sum().backward()
                return args.batch
            return run

        rates = interleaved_rates({"torch": step(True), "shrink": step(False)}, repeats=args.repeats, warmup=1)
        grads = {}
        for name, use_torch in (("torch", True), ("shrink", False)):
            step(use_torch)()
            grads[name] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                   for a, b in zip(grads["shrink"], grads["torch"]))
        print(f"| {arch} | {size} | {rates['torch']:.1f} | {rates['shrink']:.1f} | "
              f"{rates['shrink'] / rates['torch']:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
