"""Runner for ncnn (`.param`), OpenVINO (`.xml`) and TFLite (`.tflite`) files, in their own runtime.

What the file expects comes from shrink's metadata beside it (`<file>.json`, written by
`shrink export`), else OpenVINO's embedded copy, else the defaults (112 px, mean = std = 127.5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shrinkcli.evaluate.runners import EmbeddingRunner, _json


class DeployRunner(EmbeddingRunner):
    def __init__(self, path: Path, sha256: str, *, threads: int = 1):
        from shrinkcli.export import deploy

        self.kind = deploy.SUFFIX_RUNTIME[Path(path).suffix.lower()]
        deploy.require(self.kind)
        runtime = deploy.module(self.kind)
        metadata = deploy.read_sidecar(path)
        if not metadata and self.kind == "openvino":
            metadata = runtime.read_metadata(Path(path))
        crop = _json(metadata.get("crop")) or None
        super().__init__(path, sha256, {
            "arch": metadata.get("architecture"), "arch_kwargs": _json(metadata.get("arch_kwargs")),
            "input_size": metadata.get("input_size") or 112, "mean": metadata.get("mean", 127.5),
            "std": metadata.get("std", 127.5), "crop": crop})
        self.crop_recorded = "crop" in metadata
        self.metadata = metadata
        self.dtype = metadata.get("dtype", "int8" if "int8" in Path(path).name else "fp32")
        self.uint8_input = metadata.get("preprocess_in_graph") == "true"
        self.nhwc = metadata.get("layout") == "nhwc"
        self._runtime = runtime
        # one loaded model for every batch: loading (compiling, for OpenVINO) costs more than a batch
        opener = {"ncnn": "open_net", "openvino": "compile_model", "tflite": "interpreter"}[self.kind]
        self._loaded = getattr(runtime, opener)(Path(path), threads)
        self._keyword = {"ncnn": "net", "openvino": "compiled", "tflite": "runner"}[self.kind]

    def forward_uint8(self, pixels: Any) -> np.ndarray:
        pixels = np.asarray(pixels)
        if self.uint8_input:
            feed = np.ascontiguousarray(pixels.transpose(0, 2, 3, 1) if self.nhwc else pixels)
        else:
            feed = ((pixels.astype(np.float32) - self.mean) / self.std).astype(np.float32)
        return np.asarray(self._runtime.embed(self.path, feed, **{self._keyword: self._loaded}), dtype=np.float32)

    def params(self) -> int | None:
        return None

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._runtime.companion_files(self.path) if p.exists())

