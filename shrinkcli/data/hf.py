"""Hugging Face `datasets`: a `save_to_disk` folder, parquet files, or a hub name (needs network).

Spec: `hf:PATH_OR_NAME[?image=COL&label=COL&split=SPLIT]`. Columns default to the first of
image/img/jpg/png and label/labels/identity/id. Image columns are read undecoded (bytes) and go
through the shared decode path, so a picture gives the same tensor as from any other reader.
String labels are numbered in sorted order. The table is opened lazily in each worker process.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np

from shrinkcli.data.base import FaceDataset
from shrinkcli.data.transforms import decode_image, prepare_pil
from shrinkcli.errors import BadInputError

IMAGE_COLUMNS = ("image", "img", "jpg", "png", "face")
LABEL_COLUMNS = ("label", "labels", "identity", "id", "person")
QUERY_KEYS = {"image", "label", "split"}


def parse_hf_spec(text: str) -> tuple[str, dict[str, str]]:
    location, _, query = text.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=False))
    unknown = sorted(set(options) - QUERY_KEYS)
    if unknown:
        raise BadInputError(f"hf spec {text!r}: unknown option(s) {', '.join(unknown)}",
                            hint="use hf:PATH?image=COL&label=COL&split=SPLIT")
    return location, options


def open_hf_table(location: str, split: str | None):
    """The `datasets.Dataset` behind a location, or BadInputError."""
    import datasets

    path = Path(location)
    try:
        if path.is_dir() and any((path / m).is_file() for m in ("dataset_info.json", "state.json", "dataset_dict.json")):
            table = datasets.load_from_disk(str(path))
        elif path.is_file() or (path.is_dir() and any(path.rglob("*.parquet"))):
            files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))
            table = datasets.load_dataset("parquet", data_files=files, split="train")
        elif path.is_dir():
            table = datasets.load_dataset("imagefolder", data_dir=str(path), split=split or "train")
        else:
            table = datasets.load_dataset(location, split=split or "train")
    except BadInputError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFound, ConnectionError, DatasetNotFound...)
        raise BadInputError(f"cannot open HF dataset {location!r}: {type(exc).__name__}: {exc}",
                            hint="pass a save_to_disk folder, parquet files, or a hub name with network access") from None
    if isinstance(table, datasets.DatasetDict):
        name = split or ("train" if "train" in table else next(iter(table)))
        if name not in table:
            raise BadInputError(f"HF dataset {location!r} has no split {name!r}", hint=f"splits: {', '.join(table)}")
        table = table[name]
    return table


def _pick(columns, wanted: str | None, candidates, what: str, location: str) -> str:
    if wanted:
        if wanted not in columns:
            raise BadInputError(f"HF dataset {location!r} has no column {wanted!r}", hint=f"columns: {', '.join(columns)}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise BadInputError(f"HF dataset {location!r}: no {what} column found among {', '.join(columns)}",
                        hint=f"name it with hf:PATH?{what}=COLUMN")


class HFDataset(FaceDataset):
    _unpicklable = ("_table",)

    def __init__(self, text: str, *, spec: str | None = None, **options):
        self.spec = spec or f"hf:{text}"
        self.location, query = parse_hf_spec(text)
        self.split = query.get("split")
        table = open_hf_table(self.location, self.split)
        self.image_column = _pick(table.column_names, query.get("image"), IMAGE_COLUMNS, "image", self.location)
        self.label_column = _pick(table.column_names, query.get("label"), LABEL_COLUMNS, "label", self.location)
        table = self._undecoded(table)
        feature = table.features[self.label_column]
        raw = table.with_format(None)[self.label_column]
        num_classes = getattr(feature, "num_classes", None)
        if raw and isinstance(raw[0], str):
            self.class_names = sorted(set(raw))
            lookup = {name: i for i, name in enumerate(self.class_names)}
            labels = np.asarray([lookup[name] for name in raw], dtype=np.int64)
        else:
            try:
                labels = np.asarray(raw, dtype=np.int64)
            except (TypeError, ValueError):
                raise BadInputError(f"HF dataset {self.location!r}: label column {self.label_column!r} "
                                    "is not integers or strings") from None
            self.class_names = list(getattr(feature, "names", [])) or None
        self._table = table
        super().__init__(labels, num_classes=num_classes, **options)

    def _undecoded(self, table):
        import datasets

        if isinstance(table.features[self.image_column], datasets.Image):
            table = table.cast_column(self.image_column, datasets.Image(decode=False))
        return table

    @property
    def table(self):
        if self._table is None:
            self._table = self._undecoded(open_hf_table(self.location, self.split))
        return self._table

    def describe(self, index: int) -> str:
        return f"{self.spec} row {index}"

    def encoded(self, index: int):
        return self.table[int(index)][self.image_column]

    def _load(self, index: int) -> np.ndarray:
        value = self.encoded(index)
        where = self.describe(index)
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, str, os.PathLike)):
            return decode_image(value, input_size=self.input_size, crop=self.crop, where=where)
        if hasattr(value, "convert"):  # a PIL image
            image = prepare_pil(value, input_size=self.input_size, crop=self.crop)
        else:
            from PIL import Image

            array = np.asarray(value, dtype=np.uint8)
            if array.ndim not in (2, 3):
                raise BadInputError(f"{where}: image array of shape {array.shape} is not HxW or HxWxC")
            image = prepare_pil(Image.fromarray(array), input_size=self.input_size, crop=self.crop)
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
