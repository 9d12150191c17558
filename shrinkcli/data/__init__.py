"""Data layer: readers (image folders, insightface RecordIO, HF datasets, synthetic faces),
verification pairs (.bin packs, LFW pairs.txt, seeded pairs), identity splits and transforms.

Everything heavy is imported lazily so `shrink --help` stays fast.
"""

from __future__ import annotations

from shrinkcli.data.pairs import PairSet, build_pairs, load_pairs
from shrinkcli.data.spec import detect_kind, open_dataset
from shrinkcli.data.transforms import decode_image, normalize

__all__ = ["open_dataset", "load_pairs", "normalize", "PairSet", "build_pairs", "decode_image", "detect_kind"]
