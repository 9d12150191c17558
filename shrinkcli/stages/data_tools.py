"""`shrink data inspect|pack`: look inside a dataset, or pack one as insightface RecordIO (+ .bin)."""

from __future__ import annotations

import io
import time
from collections import Counter
from pathlib import Path
from typing import Any

from shrinkcli import log
from shrinkcli.errors import BadInputError

HISTOGRAM_BUCKETS = ((1, 1), (2, 2), (3, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, None))
SIZE_SAMPLE_WITHOUT_CHECK = 200
MAX_LISTED_CORRUPT = 20


def run(action: str, **kwargs: Any) -> dict:
    if action == "inspect":
        return inspect(**kwargs)
    if action == "pack":
        return pack(**kwargs)
    raise BadInputError(f"unknown data action {action!r}", hint="use inspect or pack")


def _source_size(dataset, index: int) -> tuple[int, int]:
    from shrinkcli.data.transforms import image_size

    if hasattr(dataset, "pil_image"):
        return dataset.pil_image(index).size
    source = dataset.path(index) if hasattr(dataset, "path") else dataset.encoded(index)
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if not isinstance(source, (bytes, bytearray, str, Path)):
        return tuple(reversed(dataset.load_uint8(index).shape[1:]))  # arrays / PIL from HF
    return image_size(source, where=dataset.describe(index))


def _inspect_bin(path: str, check_images: bool) -> dict:
    from shrinkcli.data.binpack import read_bin
    from shrinkcli.data.transforms import image_size

    images, issame = read_bin(path)
    sizes, corrupt = Counter(), []
    for i, blob in enumerate(images if check_images else images[:SIZE_SAMPLE_WITHOUT_CHECK]):
        try:
            width, height = image_size(blob, where=f"{path} image {i}")
            sizes[f"{width}x{height}"] += 1
        except BadInputError as exc:
            corrupt.append({"image": i, "error": exc.message})
    summary = {"source": path, "format": "bin", "pairs": len(issame), "same": sum(issame),
               "different": len(issame) - sum(issame), "images": len(images), "corrupt": len(corrupt)}
    tables = {"image sizes": [{"size": s, "images": n} for s, n in sizes.most_common(10)]}
    if corrupt:
        tables["corrupt images"] = corrupt[:MAX_LISTED_CORRUPT]
    return {"summary": summary, "tables": tables}


def inspect(data: str, check_images: bool = True) -> dict:
    import numpy as np

    from shrinkcli.data import open_dataset

    if str(data).endswith(".bin"):
        return _inspect_bin(str(data), check_images)
    dataset = open_dataset(data, input_size=None)
    counts = dataset.identity_counts()
    histogram = []
    for low, high in HISTOGRAM_BUCKETS:
        mask = (counts >= low) if high is None else ((counts >= low) & (counts <= high))
        if mask.any():
            label = f"{low}+" if high is None else (str(low) if low == high else f"{low}-{high}")
            histogram.append({"images per identity": label, "identities": int(mask.sum()),
                              "images": int(counts[mask].sum())})
    indices = range(len(dataset)) if check_images else range(min(len(dataset), SIZE_SAMPLE_WITHOUT_CHECK))
    sizes, corrupt = Counter(), []
    started = time.perf_counter()
    for index in indices:
        try:
            width, height = _source_size(dataset, index)
            sizes[f"{width}x{height}"] += 1
        except BadInputError as exc:
            corrupt.append({"image": dataset.describe(index), "error": exc.message})
    summary = {
        "source": dataset.spec, "reader": type(dataset).__name__, "identities": dataset.num_classes,
        "images": len(dataset), "identities_with_2plus": int((counts >= 2).sum()),
        "images_per_identity_min": int(counts.min()), "images_per_identity_median": float(np.median(counts)),
        "images_per_identity_max": int(counts.max()), "empty_identities_skipped": dataset.skipped,
        "images_checked": len(indices), "corrupt": len(corrupt) if check_images else "not checked",
        "check_seconds": round(time.perf_counter() - started, 2),
    }
    tables = {"identity histogram": histogram,
              "image sizes" + ("" if check_images else f" (first {len(indices)})"):
                  [{"size": s, "images": n} for s, n in sizes.most_common(10)]}
    if corrupt:
        tables["corrupt images"] = corrupt[:MAX_LISTED_CORRUPT]
    return {"summary": summary, "tables": tables}


def _encode(dataset, index: int, image_format: str, quality: int) -> tuple[bytes, tuple[int, int]]:
    """Encoded image bytes for a record. JPEG sources packed as jpg are copied verbatim (no second
    lossy generation); everything else is decoded to RGB and re-encoded."""
    from PIL import Image

    raw = None
    if hasattr(dataset, "path"):
        raw = dataset.path(index).read_bytes()
    elif hasattr(dataset, "encoded") and not hasattr(dataset, "pil_image"):
        value = dataset.encoded(index)
        raw = value.get("bytes") if isinstance(value, dict) else (value if isinstance(value, bytes) else None)
    array = dataset.load_uint8(index).transpose(1, 2, 0)  # also validates the image
    size = (array.shape[1], array.shape[0])
    if raw is not None and image_format == "jpg" and raw[:3] == b"\xff\xd8\xff":
        return raw, size
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(array).save(buffer, format="PNG")
    else:
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), size


def pack(data: str, output: str, bin_pairs: int | None = None, quality: int = 95, image_format: str = "jpg",
         seed: int = 0) -> dict:
    import numpy as np

    from shrinkcli.data import build_pairs, open_dataset
    from shrinkcli.data.binpack import write_bin
    from shrinkcli.data.recordio_writer import write_recordio

    image_format = image_format.lower().replace("jpeg", "jpg")
    if image_format not in ("jpg", "png"):
        raise BadInputError(f"--format must be jpg or png, got {image_format!r}")
    if not 1 <= quality <= 100:
        raise BadInputError(f"--quality must lie in 1..100, got {quality}")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"output {out} exists and is not a folder")
    dataset = open_dataset(data, input_size=None)
    started = time.perf_counter()
    order = np.argsort(dataset.labels, kind="stable")
    sizes: Counter = Counter()

    def encoded():   # one image at a time: a large folder never sits in memory
        for count, index in enumerate(order, start=1):
            blob, size = _encode(dataset, int(index), image_format, quality)
            sizes[size] += 1
            if count % 1000 == 0:
                log.info(f"packed {count}/{len(order)} images")
            yield int(dataset.labels[index]), blob

    stats = write_recordio(out, encoded(), dataset.num_classes, lambda: sizes.most_common(1)[0][0],
                           count=len(order))
    common_size = stats["image_size"]
    summary = {"source": dataset.spec, "output": str(out), "images": stats["images"],
               "identities": stats["identities"], "rec_bytes": stats["bytes"], "format": image_format,
               "property": f"{dataset.num_classes},{common_size[1]},{common_size[0]}"}
    if bin_pairs:
        left, right, issame, _ = build_pairs(dataset.labels, int(bin_pairs), seed=seed)
        blobs = {}
        for index in set(left.tolist()) | set(right.tolist()):
            blobs[index] = _encode(dataset, index, image_format, quality)[0]
        images = [blob for a, b in zip(left, right) for blob in (blobs[int(a)], blobs[int(b)])]
        bin_path = write_bin(out / "verify.bin", images, issame)
        summary.update(bin=str(bin_path), bin_pairs=len(issame))
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return {"summary": summary}
