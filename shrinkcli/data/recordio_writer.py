"""Writing insightface-compatible RecordIO: records split where the magic word occurs (as mxnet's
writer does), a meta header, one record per identity, the `.idx` and the `property` file."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Callable, Iterable

from shrinkcli.atomic import atomic_open, atomic_write_text
from shrinkcli.data.recordio import LENGTH_MASK, MAGIC, MAGIC_BYTES, _pad, pack_header


def frame_record(payload: bytes) -> bytes:
    """One payload framed as RecordIO bytes, split at 4-byte-aligned magic words."""
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == MAGIC_BYTES]
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(payload[start:cut])
        start = cut + 4
    pieces.append(payload[start:])
    out = bytearray()
    for position, piece in enumerate(pieces):
        if len(pieces) == 1:
            cflag = 0
        else:
            cflag = 1 if position == 0 else (3 if position == len(pieces) - 1 else 2)
        if len(piece) > LENGTH_MASK:
            raise ValueError("record part larger than 512 MiB")
        out += struct.pack("<II", MAGIC, (cflag << 29) | len(piece)) + piece + b"\0" * _pad(len(piece))
    return bytes(out)


def write_recordio(folder: str | os.PathLike, samples: Iterable[tuple[int, bytes]], num_classes: int,
                   image_size: tuple[int, int] | Callable[[], tuple[int, int]], *, header: bool = True,
                   count: int | None = None) -> dict:
    """Write train.rec/train.idx/property from (label, encoded image) samples sorted by label.
    With `header`, key 0 is the meta header and identity records follow the images (insightface).

    Images are written as they come: with `count` (the number of samples, which the header needs
    first) `samples` may be a generator and is never held in memory. `image_size` may be a callable,
    asked after the last sample (e.g. the most common size seen while encoding).
    """
    folder = Path(folder)
    lines: list[str] = []
    ranges: dict[int, list[int]] = {}
    offset = 0
    images = 0
    if count is None:
        samples = list(samples)
        count = len(samples)
    with atomic_open(folder / "train.rec", "wb") as rec:
        def put(key: int, payload: bytes) -> None:
            nonlocal offset
            framed = frame_record(payload)
            rec.write(framed)
            lines.append(f"{key}\t{offset}")
            offset += len(framed)

        first_key = 1 if header else 0
        if header:
            put(0, pack_header([count + 1, count + 1 + num_classes], b"", id1=0))
        previous = None
        for position, (label, image) in enumerate(samples):
            if previous is not None and label < previous:
                raise ValueError("write_recordio needs samples sorted by label (identity ranges are contiguous)")
            if position >= count:
                raise ValueError(f"write_recordio was promised {count} samples and got more")
            previous = label
            key = first_key + position
            put(key, pack_header(float(label), image, id1=key))
            ranges.setdefault(int(label), [key, key + 1])[1] = key + 1
            images += 1
        if images != count:
            raise ValueError(f"write_recordio was promised {count} samples and got {images}")
        if header:
            for identity in range(num_classes):
                low, high = ranges.get(identity, [0, 0])
                put(count + 1 + identity, pack_header([low, high], b""))
    if callable(image_size):
        image_size = image_size()
    atomic_write_text(folder / "train.idx", "\n".join(lines) + "\n")
    atomic_write_text(folder / "property", f"{num_classes},{image_size[1]},{image_size[0]}\n")
    return {"images": images, "identities": num_classes, "bytes": offset, "image_size": tuple(image_size)}
