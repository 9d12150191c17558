"""Suite `scale`: the million-scale parts of the pipeline, one function per part (see `PARTS`).

Part `megaface`: MegaFace challenge-1 rank-1 over a feature store of 1,000,000 distractors
(512-d float16, synthetic unit vectors: the timing and memory depend on the sizes, not on what
the vectors show) against 3,530 probe images of 80 identities (FaceScrub's size in the challenge).
The rank-1 runs in a child process (`python -m shrinkcli.bench.scale megaface ...`) whose peak RSS
comes from the kernel's rusage, as in the `memory` suite; wall time is that child's, from start
to exit. Targets: <= 5 minutes and <= 3 GB on a 2-core machine.

Part `partialfc`: the teacher step with a sampled (0.1) margin head at 10k, 100k and 1M classes on
1 and 2 gloo ranks (see shrinkcli.bench.partial_fc). Targets: 1M classes <= 2x the 10k step, and
half the per-rank head memory at 2 ranks.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from shrinkcli.bench.timing import info_row, ratio_row

SUITE = "scale"
PARTS = ("megaface", "partialfc")
DIM = 512
WALL_TARGET_S = 300.0
RSS_TARGET_MIB = 3072.0


def synthetic_store(path: Path, count: int, *, dim: int = DIM, seed: int = 0, chunk: int = 65536) -> float:
    """Write `count` random unit vectors (float16) as a feature store; returns the seconds it took."""
    from shrinkcli.evaluate.store import StoreWriter

    started = time.perf_counter()
    identity = {"model_sha256": f"synthetic-unit-vectors-seed{seed}", "data": f"synthetic-vectors:{count}x{dim}",
                "preprocess": {}, "count": count, "dtype": "float16", "chunk_size": chunk}
    writer = StoreWriter(path, identity, np.full(count, -1, dtype=np.int64), overwrite=True)
    rng = np.random.default_rng(seed)
    for index in writer.pending():
        start, stop = writer.rows(index)
        rows = rng.standard_normal((stop - start, dim), dtype=np.float32)
        writer.write(index, rows / np.linalg.norm(rows, axis=1, keepdims=True))
    writer.finish()
    return time.perf_counter() - started


def synthetic_probes(identities: int, images: int, *, dim: int = DIM, seed: int = 1,
                     spread: float = 1.7) -> tuple[np.ndarray, np.ndarray]:
    """`images` unit vectors spread over `identities` centres; genuine cosines near 1 / (1 + spread^2)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(images) % identities
    centres = rng.standard_normal((identities, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((images, dim)) * (spread / np.sqrt(dim))
    probes = centres[labels] + noise
    return (probes / np.linalg.norm(probes, axis=1, keepdims=True)).astype(np.float32), labels


def _megaface(quick: bool) -> list[dict[str, Any]]:
    from shrinkcli.bench.memory import peak_rss

    count, identities, images = (20_000, 20, 200) if quick else (1_000_000, 80, 3530)
    settings = f"{count:,} x {DIM} float16 distractors, {images} probes of {identities} identities"
    with tempfile.TemporaryDirectory(prefix="shrink-bench-scale-") as tmp:
        root = Path(tmp)
        write_s = synthetic_store(root / "store", count)
        probes, labels = synthetic_probes(identities, images)
        np.save(root / "probes.npy", probes)
        np.save(root / "labels.npy", labels)
        command = [sys.executable, "-m", "shrinkcli.bench.scale", "megaface", str(root / "store"),
                   str(root / "probes.npy"), str(root / "labels.npy"), str(root / "result.json")]
        mib, seconds, code = peak_rss(command)
        result = json.loads((root / "result.json").read_text()) if code == 0 else {}
        store_mib = (root / "store" / "features.npy").stat().st_size / 2**20
    status = "ok" if code == 0 else f"exit {code}"
    return [
        ratio_row(SUITE, "megaface: rank-1 wall time / 5 min", a="wall s", a_value=seconds, b="target s",
                  b_value=WALL_TARGET_S, unit="s", ratio=seconds / WALL_TARGET_S, target=1.0, higher_is_better=False,
                  settings=f"{status}; {settings}; child process from start to exit, blocked fp32 matmul"),
        ratio_row(SUITE, "megaface: rank-1 peak RSS / 3 GB", a="peak RSS MiB", a_value=mib, b="target MiB",
                  b_value=RSS_TARGET_MIB, unit="MiB", ratio=mib / RSS_TARGET_MIB, target=1.0, higher_is_better=False,
                  settings=f"{status}; {settings}; store on disk {store_mib:.0f} MiB, ru_maxrss of the child"),
        info_row(SUITE, "megaface: rank-1 (synthetic)", a="rank-1", a_value=result.get("rank1"), unit="fraction",
                 b="trials", b_value=result.get("trials"),
                 settings=f"{settings}; {result.get('block_rows')} distractor rows per block"),
        info_row(SUITE, "megaface: write the store", a="write s", a_value=write_s, unit="s",
                 b="rows/s", b_value=count / max(write_s, 1e-9), settings=f"{settings}; shrink's StoreWriter, chunks of 65536"),
    ]


def _partialfc(quick: bool) -> list[dict[str, Any]]:
    from shrinkcli.bench.partial_fc import run_part

    return run_part(quick)


def run(quick: bool = False, **_: Any) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for part in PARTS:
        rows += globals()[f"_{part}"](quick)
    return {"rows": rows}


def _megaface_child(store: str, probes: str, labels: str, out: str) -> None:
    """The measured process: numpy and shrink's evaluation code only (no torch)."""
    from shrinkcli.atomic import atomic_write_json
    from shrinkcli.evaluate.megaface import megaface_rank1
    from shrinkcli.evaluate.store import FeatureStore

    started = time.perf_counter()
    features = FeatureStore(store)
    probe_emb = np.load(probes)
    block = features.block_rows_for(len(probe_emb))
    result = megaface_rank1(probe_emb, np.load(labels), features.blocks(block))
    atomic_write_json(out, {**result, "block_rows": block, "seconds": time.perf_counter() - started})


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "megaface":
        _megaface_child(*sys.argv[2:])
    else:
        sys.exit("usage: python -m shrinkcli.bench.scale megaface STORE PROBES.npy LABELS.npy OUT.json")
