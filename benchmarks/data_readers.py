"""Decode throughput per reader: images/s at 112x112 through a DataLoader with N workers.

    python benchmarks/data_readers.py [--images 512] [--workers 0 2] [--folder PATH]

Folder, rec and hf read the same images (a synthetic set packed to each format in a temp dir,
JPEG q95), so the numbers compare the readers, not the data; `--folder` adds a real tree.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from shrinkcli.bench.data import materialise


def measure(spec: str, workers: int, batch_size: int = 64) -> float:
    import torch

    from shrinkcli.data import open_dataset

    dataset = open_dataset(spec, input_size=112)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    started = time.perf_counter()
    seen = sum(batch[0].shape[0] for batch in loader)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--folder", help="also measure a real identity-folder tree")
    args = parser.parse_args()
    per_identity = 8
    with tempfile.TemporaryDirectory() as tmp:
        specs = materialise(Path(tmp), max(1, args.images // per_identity), per_identity)
        if args.folder:
            specs["folder (real)"] = f"folder:{args.folder}"
        print("| reader | workers | images/s at 112x112 |")
        print("|---|---|---|")
        for name, spec in specs.items():
            for workers in args.workers:
                print(f"| {name} | {workers} | {measure(spec, workers):.0f} |", flush=True)


if __name__ == "__main__":
    main()
