"""insightface `.bin` verification packs: `pickle((bins, issame_list))`, pair i = bins[2i], bins[2i+1].

Pickle runs code named in the file, so packs are read with a restricted unpickler that resolves
only the globals the format needs (numpy array reconstruction, for packs whose images are numpy
uint8 arrays); anything else is refused before it can be called. Python 2 packs are read with
`encoding='bytes'`, so their str objects arrive as bytes.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from shrinkcli.data.pairset import PairSet, decode_many
from shrinkcli.data.transforms import decode_image
from shrinkcli.errors import BadInputError

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # protocol 2 (py2) pickles spell bytes as _codecs.encode(str, 'latin1')
    ("_codecs", "encode"),
    ("builtins", "bytes"),
    ("__builtin__", "bytes"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, handle, path: Path):
        super().__init__(handle, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            if name == "_reconstruct":
                try:  # numpy >= 2 moved it; both spellings resolve to the same function
                    from numpy._core.multiarray import _reconstruct
                except ImportError:  # pragma: no cover - numpy 1.x
                    from numpy.core.multiarray import _reconstruct
                return _reconstruct
            if module == "numpy":
                return getattr(np, name)
            return super().find_class(module, name)
        raise BadInputError(f"{self._path}: refusing to load global {module}.{name} from a .bin pack",
                            hint="a verification pack only holds encoded images and booleans; the file "
                                 "may be malicious or not a .bin pack")


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read .bin pack {path}: {exc.strerror}") from exc
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), path).load()
    except BadInputError:
        raise
    except Exception as exc:  # any malformed pickle: EOF, bad opcode, wrong numpy payload...
        raise BadInputError(f"{path} is not a readable .bin pack: {type(exc).__name__}: {exc}") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise BadInputError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    try:
        images = [item.tobytes() if isinstance(item, np.ndarray) else bytes(item) for item in bins]
        flags = [bool(flag) for flag in (issame.tolist() if isinstance(issame, np.ndarray) else issame)]
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"{path}: images must be bytes and issame booleans ({exc})") from None
    if len(images) != 2 * len(flags):
        raise BadInputError(f"{path}: {len(images)} images for {len(flags)} pairs (expected twice as many)")
    return images, flags


def load_bin(path: str | os.PathLike, *, input_size: int = 112, crop: int | None = None, nfolds: int = 10):
    images, issame = read_bin(path)
    loaders = [lambda b=blob, i=i: decode_image(b, input_size=input_size, crop=crop, where=f"{path} image {i}")
               for i, blob in enumerate(images)]
    count = len(issame)
    # insightface's protocol: sequential, unshuffled folds
    folds = (np.arange(count) * nfolds) // max(count, 1)
    return PairSet(decode_many(loaders), np.arange(0, 2 * count, 2), np.arange(1, 2 * count, 2), issame,
                   folds, None, str(path))


def write_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> Path:
    """Write a pack readable by insightface's `load_bin` (and ours): protocol 4 pickle."""
    from shrinkcli.atomic import atomic_write_bytes

    if len(images) != 2 * len(issame):
        raise BadInputError(f"write_bin: {len(images)} images for {len(issame)} pairs")
    payload = pickle.dumps(([bytes(b) for b in images], [bool(s) for s in issame]), protocol=4)
    return atomic_write_bytes(path, payload)
