"""Suite `data`: can each reader feed the distill step? Decode rate vs the step's consumption.

A: images/s one reader delivers through a DataLoader (batch 64, N workers, the engine's default),
decoding and resizing to the distill benchmark's input size. B: images/s the full distill step
(engine + DistillTask, as in suite `distill`) consumes. Target: A/B >= 3, so decoding stays far
off the critical path even when the machine is busy. Folder, rec and hf read the same synthetic
faces packed to each format (JPEG q95) in a temp dir, so they compare readers, not data; the
real LFW tree (250 px JPEGs, centre crop 128) is added when ../shared/data/lfw is present.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from shrinkcli.bench.distill import DistillSettings, StepRunners
from shrinkcli.bench.timing import interleaved_rates, ratio_row

SUITE = "data"
LFW_CROP = 128


def lfw_images_root() -> Path | None:
    root = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lfw" / "images"
    return root if root.is_dir() else None


def materialise(root: Path, identities: int, per_identity: int) -> dict[str, str]:
    """Synthetic faces written as an identity-folder tree, a RecordIO pack and an HF dataset."""
    import datasets

    from shrinkcli.data import open_dataset
    from shrinkcli.stages import data_tools

    source = open_dataset(f"synthetic:{identities}:{per_identity}:0", input_size=None)
    folder = root / "folder"
    images, labels = [], []
    for index in range(len(source)):
        target = folder / f"id{source.labels[index]:05d}" / f"{index:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        source.pil_image(index).save(target, quality=95)
        images.append({"bytes": target.read_bytes(), "path": None})
        labels.append(int(source.labels[index]))
    data_tools.run("pack", data=f"folder:{folder}", output=str(root / "rec"), image_format="jpg")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(root / "hf"))
    return {"folder": f"folder:{folder}", "rec": f"rec:{root / 'rec' / 'train.rec'}", "hf": f"hf:{root / 'hf'}",
            "synthetic": f"synthetic:{identities}:{per_identity}:0"}


def reader_workload(spec: str, *, input_size: int, crop: int | None, images: int, workers: int, batch_size: int):
    """A callable that decodes `images` images of `spec` through a fresh DataLoader (as each epoch does)."""
    from shrinkcli.data import open_dataset

    dataset = open_dataset(spec, input_size=input_size, crop=crop)
    subset = torch.utils.data.Subset(dataset, range(min(images, len(dataset))))

    def decode() -> int:
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers, shuffle=False)
        return sum(batch[0].shape[0] for batch in loader)

    return decode


def run(quick: bool = False, **_: Any) -> dict[str, Any]:
    from shrinkcli import log
    from shrinkcli.config import TrainConfig

    settings = DistillSettings.for_run(quick)
    workers = TrainConfig().workers
    images = 128 if quick else 512
    repeats = 2 if quick else 3
    runners = StepRunners(settings)
    with tempfile.TemporaryDirectory(prefix="shrink-bench-data-") as tmp:
        specs = {name: (spec, None) for name, spec in materialise(Path(tmp), max(1, images // 8), 8).items()}
        lfw = lfw_images_root()
        if lfw is not None:
            specs["folder (LFW, real)"] = (f"folder:{lfw}", LFW_CROP)
        else:
            log.info("bench data: ../shared/data/lfw not found; the real-folder row is skipped")
        workloads = {name: reader_workload(spec, input_size=settings.input_size, crop=crop, images=images,
                                           workers=workers, batch_size=64)
                     for name, (spec, crop) in specs.items()}
        workloads["distill step"] = runners.engine
        rates = interleaved_rates(workloads, repeats=repeats, warmup=1)
    consumption = rates.pop("distill step")
    detail = (f"{images} images, DataLoader batch 64, {workers} workers, {settings.input_size} px; "
              f"B = {settings.describe()}")
    rows = [ratio_row(SUITE, f"decode {name} vs distill consumption", a=f"{name} reader", a_value=rate,
                      b="distill step", b_value=consumption, unit="img/s", ratio=rate / consumption, target=3.0,
                      settings=detail + (f", crop {specs[name][1]}" if specs[name][1] else ""))
            for name, rate in rates.items()]
    return {"rows": rows}
