"""insightface RecordIO (`train.rec` + `train.idx` + `property`) without mxnet.

Record framing: `uint32 magic 0xCED7230A`, `uint32 lrec` (cflag = lrec >> 29, length = low 29
bits), payload, zero padding to 4 bytes. A payload holding the magic word at a 4-byte-aligned
offset is written as parts with cflag 1 (first), 2 (middle), 3 (last); the magic between them is
dropped by the writer and restored here. Payload = IRHeader `<IfQQ` (flag, label, id, id2), then
`flag` float32 labels when flag > 0 (the identity is labels[0]), then the encoded image.

Record 0 is a meta header when flag > 0 and it carries no image: labels (N+1, N+1+num_ids), image
keys 1..N, then one record per identity. Files without it (e.g. DALI-shuffled) use every key.

Colour: insightface encodes with `cv2.imencode` on a BGR array; cv2 converts BGR to the JPEG's
YCbCr itself, so the JPEG holds true colours and PIL decodes it to correct RGB (this is also what
mxnet's `imdecode` returns). No channel swap is applied.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from shrinkcli import log
from shrinkcli.data.base import FaceDataset
from shrinkcli.data.transforms import decode_image
from shrinkcli.errors import BadInputError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_MASK = (1 << 29) - 1
IR_HEADER = struct.Struct("<IfQQ")


def _pad(length: int) -> int:
    return (4 - length % 4) % 4


class RecordFile:
    """Random access to a .rec by offset, through `os.pread` (no shared file position, so forked
    DataLoader workers cannot disturb each other); the descriptor is reopened in each process."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
        except OSError as exc:
            raise BadInputError(f"cannot read RecordIO file {self.path}: {exc.strerror}") from exc
        self._fd: int | None = None
        self._pid: int | None = None

    def __getstate__(self):
        return {"path": self.path, "size": self.size, "_fd": None, "_pid": None}

    def _read(self, offset: int, length: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, length, offset)

    def _part(self, offset: int) -> tuple[int, bytes, int]:
        head = self._read(offset, 8)
        if len(head) < 8:
            raise BadInputError(f"{self.path}: truncated record header at offset {offset} (file has {self.size} bytes)",
                                hint="the .rec is truncated or the .idx points past its end")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise BadInputError(f"{self.path}: wrong magic 0x{magic:08X} at offset {offset}",
                                hint="the .idx does not match this .rec, or the file is not RecordIO")
        cflag, length = lrec >> 29, lrec & LENGTH_MASK
        data = self._read(offset + 8, length)
        if len(data) < length:
            raise BadInputError(f"{self.path}: record at offset {offset} claims {length} bytes, only {len(data)} left",
                                hint="the .rec is truncated")
        return cflag, data, offset + 8 + length + _pad(length)

    def read(self, offset: int) -> tuple[bytes, int]:
        """The payload of the record starting at `offset` and the offset after it."""
        cflag, data, position = self._part(offset)
        if cflag == 0:
            return data, position
        if cflag != 1:
            raise BadInputError(f"{self.path}: record at offset {offset} starts with continuation flag {cflag}",
                                hint="the .idx offset does not point at the start of a record")
        parts = [data]
        while True:
            part_offset = position
            cflag, data, position = self._part(part_offset)
            if cflag not in (2, 3):
                raise BadInputError(f"{self.path}: split record from offset {offset} broken at offset "
                                    f"{part_offset} (flag {cflag})", hint="the .rec is corrupt")
            parts.append(data)
            if cflag == 3:
                return MAGIC_BYTES.join(parts), position

    def scan(self) -> Iterator[int]:
        """Offsets of all records in file order (to rebuild a missing .idx)."""
        offset = 0
        while offset < self.size:
            _, next_offset = self.read(offset)
            yield offset
            offset = next_offset


def unpack_header(payload: bytes, where: str) -> tuple[int, np.ndarray, int, int, bytes]:
    """(flag, labels float32 array, id, id2, image bytes)."""
    if len(payload) < IR_HEADER.size:
        raise BadInputError(f"{where}: record of {len(payload)} bytes is shorter than its 24-byte header")
    flag, label, id1, id2 = IR_HEADER.unpack_from(payload)
    start = IR_HEADER.size
    if flag > 0:
        end = start + 4 * flag
        if len(payload) < end:
            raise BadInputError(f"{where}: header claims {flag} labels, record too short")
        labels = np.frombuffer(payload[start:end], dtype="<f4").astype(np.float32)
        return flag, labels, id1, id2, payload[end:]
    return flag, np.asarray([label], dtype=np.float32), id1, id2, payload[start:]


def pack_header(label, image: bytes, *, id1: int = 0, id2: int = 0) -> bytes:
    labels = np.atleast_1d(np.asarray(label, dtype="<f4"))
    if labels.size == 1:
        return IR_HEADER.pack(0, float(labels[0]), id1, id2) + image
    return IR_HEADER.pack(labels.size, 0.0, id1, id2) + labels.tobytes() + image


def read_index(path: Path, rec: RecordFile) -> tuple[list[int], list[int]]:
    keys, offsets = [], []
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise BadInputError(f"cannot read index {path}: {exc.strerror}") from exc
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            key, offset = int(fields[0]), int(fields[1])
            if len(fields) != 2 or offset < 0:
                raise ValueError
        except (ValueError, IndexError):
            raise BadInputError(f"{path}, line {line_no}: expected `key<TAB>offset`, got {line[:60]!r}",
                                hint="the .idx is truncated or corrupt; delete it to rebuild it from the .rec") from None
        if offset + 8 > rec.size:
            raise BadInputError(f"{path}, line {line_no}: offset {offset} of key {key} is past the end of "
                                f"{rec.path} ({rec.size} bytes)", hint="the .rec is truncated or the .idx is stale")
        keys.append(key)
        offsets.append(offset)
    return keys, offsets


def _key_table(keys: list[int], offsets: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys, their offsets) as two int64 arrays; a repeated key keeps its last offset.
    Two flat arrays, not a dict: a dataset of millions of records is pickled into every
    DataLoader worker, and a dict of Python ints costs ~100 bytes an entry there, arrays 16."""
    key_array, offset_array = np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
    order = np.argsort(key_array, kind="stable")
    key_array, offset_array = key_array[order], offset_array[order]
    last = np.append(key_array[1:] != key_array[:-1], True)     # the last of each run of equal keys
    return key_array[last], offset_array[last]


class RecordDataset(FaceDataset):
    _unpicklable = ()

    def __init__(self, path: str | os.PathLike, *, spec: str | None = None, **options):
        path = Path(path)
        rec_path = path / "train.rec" if path.is_dir() else path
        self.spec = spec or f"rec:{rec_path}"
        if not rec_path.is_file():
            raise BadInputError(f"RecordIO file {rec_path} does not exist", hint="pass rec:PATH/train.rec")
        self.rec = RecordFile(rec_path)
        idx_path = rec_path.with_suffix(".idx")
        if idx_path.is_file():
            keys, offsets = read_index(idx_path, self.rec)
        else:
            log.warning(f"{idx_path} not found: scanning {rec_path} to index it")
            offsets = list(self.rec.scan())
            keys = list(range(len(offsets)))
        if not keys:
            raise BadInputError(f"{rec_path} has no records")
        self._index_keys, self._index_offsets = _key_table(keys, offsets)
        self.header = None
        first_key = min(keys)
        flag, labels, _, _, image = self._unpack(first_key)
        if flag > 0 and len(image) == 0 and labels.size >= 2:
            self.header = (int(labels[0]), int(labels[1]))
            image_keys = [k for k in range(1, self.header[0]) if self._has(k)]
        else:
            image_keys = sorted(keys)
        self.keys = np.asarray(image_keys, dtype=np.int64)
        num_classes = self._read_property(rec_path.parent / "property")
        labels = self._identity_labels() if self.header else None
        if labels is None:
            labels = [self._label_of(int(k)) for k in self.keys]
        super().__init__(np.asarray(labels, dtype=np.int64), num_classes=num_classes, **options)

    def _has(self, key: int) -> bool:
        at = int(np.searchsorted(self._index_keys, key))
        return at < len(self._index_keys) and int(self._index_keys[at]) == key

    def _offset(self, key: int) -> int:
        at = int(np.searchsorted(self._index_keys, key))
        if at == len(self._index_keys) or int(self._index_keys[at]) != key:
            raise KeyError(key)
        return int(self._index_offsets[at])

    def _unpack(self, key: int):
        offset = self._offset(key)
        payload, _ = self.rec.read(offset)
        return unpack_header(payload, f"{self.rec.path} key {key} (offset {offset})")

    def _label_of(self, key: int) -> int:
        value = float(self._unpack(key)[1][0])
        if value != int(value) or value < 0:
            raise BadInputError(f"{self.rec.path} key {key}: label {value} is not a non-negative integer")
        return int(value)

    def _identity_labels(self) -> np.ndarray | None:
        """With a meta header the identity records give each identity's key range: reading those
        is far cheaper than every image header. Falls back (None) if they do not cover the images."""
        start, end = self.header
        labels = np.full(start, -1, dtype=np.int64)
        for identity, key in enumerate(range(start, end)):
            if not self._has(key):
                return None
            _, bounds, _, _, _ = self._unpack(key)
            if bounds.size < 2:
                return None
            low, high = int(bounds[0]), int(bounds[1])
            if low == high:
                continue  # an identity without images
            if not 1 <= low < high <= start:
                return None
            labels[low:high] = identity
        picked = labels[self.keys]
        return picked if (picked >= 0).all() else None

    @staticmethod
    def _read_property(path: Path) -> int | None:
        if not path.is_file():
            return None
        fields = path.read_text(encoding="ascii", errors="replace").strip().split(",")
        try:
            return int(fields[0])
        except ValueError:
            raise BadInputError(f"{path}: expected `num_classes,height,width`, got {fields!r}") from None

    def describe(self, index: int) -> str:
        key = int(self.keys[index])
        return f"{self.rec.path} key {key} (offset {self._offset(key)})"

    def encoded(self, index: int) -> bytes:
        return self._unpack(int(self.keys[index]))[4]

    def _load(self, index: int) -> np.ndarray:
        return decode_image(self.encoded(index), input_size=self.input_size, crop=self.crop,
                            where=self.describe(index))
