"""One "embedding runner" per artifact, so verify/compare treat ONNX and torch files alike.

- ONNX (`.onnx`) runs in onnxruntime on the CPU. What the graph expects is read from the graph
  itself (input element type: uint8 means preprocessing is inside; NHWC vs NCHW from the shape)
  and from the export metadata (input size, mean/std); the weight dtype (fp32/fp16/int8) from the
  metadata, else from the initializers and quantisation nodes.
- Weights (`.safetensors`, `.pt`, `.pth`) load through `shrinkcli.models.io.load_model` and run in
  eval mode, channels_last (depthwise convolutions are several times faster that way on CPU).
- A run dir resolves to its newest artifact of kind onnx, weights or checkpoint (manifest order).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from shrinkcli.errors import BadInputError, GateFailedError
from shrinkcli.evaluate import embed_pixels

ARTIFACT_KINDS = ["onnx", "weights", "checkpoint", "safetensors", "onnx-fp16", "onnx-int8"]
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
              "MatMulInteger", "DynamicQuantizeLinear"}


class EmbeddingRunner:
    """Common interface: `forward_uint8(pixels) -> raw embeddings`, `embed(images) -> flip-summed,
    L2-normalised embeddings`, plus what a report needs (params, MACs, size, latency)."""

    kind = "?"
    dtype = "fp32"

    def __init__(self, path: Path, sha256: str, meta: dict[str, Any]):
        self.path = Path(path)
        self.sha256 = sha256
        self.arch: str | None = meta.get("arch")
        self.arch_kwargs: dict[str, Any] = dict(meta.get("arch_kwargs") or {})
        try:    # read from the file's metadata: refuse what cannot be meant, with the file named
            self.input_size = int(meta.get("input_size") or 112)
            self.mean = float(meta.get("mean", 127.5))
            self.std = float(meta.get("std", 127.5))
        except (TypeError, ValueError) as exc:
            raise BadInputError(f"{path}: recorded preprocessing is not valid ({exc})",
                                hint="re-export the model with `shrink export`") from None
        crop = meta.get("crop")
        if (not 0 < self.input_size <= 4096 or not np.isfinite([self.mean, self.std]).all() or self.std == 0
                or (crop is not None and (not isinstance(crop, int) or isinstance(crop, bool) or crop <= 0))):
            raise BadInputError(f"{path}: recorded preprocessing is not valid (input_size {self.input_size}, "
                                f"mean {self.mean}, std {self.std}, crop {crop!r})",
                                hint="re-export the model with `shrink export`")
        self.crop = crop
        self.crop_recorded = True

    @property
    def label(self) -> str:
        return f"{self.path.name} ({self.kind} {self.dtype})"

    def forward_uint8(self, pixels: Any) -> np.ndarray:
        raise NotImplementedError

    def embed(self, images_uint8: Any, *, batch_size: int = 64, flip: bool = True) -> np.ndarray:
        return self._finite(embed_pixels(self.forward_uint8, images_uint8, batch_size=batch_size, flip=flip))

    def raw(self, images_uint8: Any, *, batch_size: int = 64) -> np.ndarray:
        """Outputs without flip or normalisation (what a parity check compares)."""
        chunks = [np.asarray(self.forward_uint8(images_uint8[i:i + batch_size]), dtype=np.float32)
                  for i in range(0, len(images_uint8), batch_size)]
        return self._finite(np.concatenate(chunks))

    def _finite(self, embeddings: np.ndarray) -> np.ndarray:
        """Every score computed from a NaN embedding is meaningless (and NaN sorts as a match)."""
        bad = int(np.size(embeddings) - np.isfinite(embeddings).sum())
        if bad:
            raise GateFailedError(f"{self.label} gives non-finite embeddings ({bad} of {np.size(embeddings)} values)",
                                  hint="the weights are corrupt or the training diverged")
        return embeddings

    def params(self) -> int | None:
        raise NotImplementedError

    def macs(self) -> int | None:
        """MACs of one image, counted on the architecture (meta device) when it is known."""
        if not self.arch:
            return None
        try:
            import torch

            from shrinkcli.models.registry import create_model
            from shrinkcli.models.summary import count_macs

            kwargs = {**self.arch_kwargs, "input_size": self.input_size}
            with torch.device("meta"):
                model = create_model(self.arch, **kwargs)
                return int(count_macs(model, self.input_size))
        except Exception:  # noqa: BLE001 - MACs are informative only; an unknown arch gives n/a
            return None

    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def latency_ms(self, batch: int, *, seconds: float = 1.0, max_repeats: int = 50) -> float:
        """Median wall time per image (ms) over repeated forwards of a `batch` of images."""
        pixels = np.random.default_rng(0).integers(0, 256, (batch, 3, self.input_size, self.input_size),
                                                   dtype=np.uint8)
        self.forward_uint8(pixels)   # warm-up: allocations, kernel selection
        times = []
        deadline = time.perf_counter() + seconds
        while not times or (time.perf_counter() < deadline and len(times) < max_repeats):
            start = time.perf_counter()
            self.forward_uint8(pixels)
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1000.0 / batch


class TorchRunner(EmbeddingRunner):
    kind = "torch"

    def __init__(self, path: Path, sha256: str):
        import torch

        from shrinkcli.models.io import load_model

        model, meta = load_model(path)
        preprocess = meta.get("preprocess") or {}
        info = {"arch": meta.get("arch") or getattr(model, "arch", None),
                "arch_kwargs": meta.get("arch_kwargs") or getattr(model, "arch_kwargs", {}),
                "input_size": preprocess.get("input_size") or getattr(model, "input_size", 112),
                "mean": preprocess.get("mean", 127.5), "std": preprocess.get("std", 127.5),
                "crop": preprocess.get("crop")}
        super().__init__(path, sha256, info)
        self.model = model.float().eval().to(memory_format=torch.channels_last)

    def forward_uint8(self, pixels: Any) -> np.ndarray:
        import torch

        x = torch.as_tensor(np.asarray(pixels)).float()
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.model(x).float().numpy()

    def params(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))


def _onnx_dtype(proto, metadata: dict[str, str]) -> str:
    import onnx

    declared = metadata.get("dtype", "").lower()
    if declared in ("fp32", "fp16", "int8"):
        return declared
    if any(node.op_type in _QUANT_OPS for node in proto.graph.node):
        return "int8"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer):
        return "fp16"
    return "fp32"


class OnnxRunner(EmbeddingRunner):
    kind = "onnx"

    def __init__(self, path: Path, sha256: str):
        import onnx
        import onnxruntime as ort

        try:
            proto = onnx.load(str(path))
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - any parse/load failure is a bad file for the user
            raise BadInputError(f"{path} is not a loadable ONNX model: {str(exc).splitlines()[0][:200]}",
                                hint="re-export it with `shrink export`") from exc
        metadata = {p.key: p.value for p in proto.metadata_props}
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        shape = list(graph_input.shape)
        self.uint8_input = graph_input.type == "tensor(uint8)"
        self.float16_input = graph_input.type == "tensor(float16)"
        self.nhwc = metadata.get("layout", "").lower() == "nhwc" or (len(shape) == 4 and shape[3] == 3 and shape[1] != 3)
        static = [d for d in (shape[2:4] if not self.nhwc else shape[1:3]) if isinstance(d, int)]
        meta = {"arch": metadata.get("architecture") or metadata.get("shrink_arch"),
                "arch_kwargs": _json(metadata.get("arch_kwargs") or metadata.get("shrink_arch_kwargs")),
                "input_size": metadata.get("input_size") or (static[0] if static else 112),
                "mean": metadata.get("mean", 127.5), "std": metadata.get("std", 127.5),
                "crop": _json(metadata.get("crop")) or None}
        preprocess = _json(metadata.get("preprocess"))
        for key in ("mean", "std", "crop", "input_size"):
            if isinstance(preprocess, dict) and preprocess.get(key) is not None and key not in metadata:
                meta[key] = preprocess[key]
        super().__init__(path, sha256, meta)
        # without a recorded crop the caller may take it from the weights the graph came from
        self.crop_recorded = "crop" in metadata or (isinstance(preprocess, dict) and "crop" in preprocess)
        self.metadata = metadata
        self.bgr = metadata.get("channel_order", "RGB").upper() == "BGR"
        self.dtype = _onnx_dtype(proto, metadata)
        self._params = int(sum(int(np.prod(init.dims)) for init in proto.graph.initializer
                               if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                     onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
                               and int(np.prod(init.dims)) > 1))

    def forward_uint8(self, pixels: Any) -> np.ndarray:
        pixels = np.asarray(pixels)
        if self.uint8_input:
            feed = np.ascontiguousarray(pixels.transpose(0, 2, 3, 1) if self.nhwc else pixels)
        else:
            feed = (pixels.astype(np.float32) - self.mean) / self.std
            if self.bgr:    # an imported teacher graph that takes BGR (recorded by `shrink teacher --load`)
                feed = np.ascontiguousarray(feed[:, ::-1])
            feed = feed.astype(np.float16 if self.float16_input else np.float32)
        return np.asarray(self.session.run(None, {self.input_name: feed})[0], dtype=np.float32)

    def params(self) -> int:
        return self._params


def _json(text: str | None) -> Any:
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}


def resolve_model_file(source: str, what: str = "model", *, allow_incomplete: bool = False):
    """A file or run dir -> the rundir Artifact to run (BadInputError with one line otherwise)."""
    from shrinkcli.rundir import resolve_artifact

    if not Path(source).exists():
        raise BadInputError(f"{what} {source} does not exist", hint="check the path (a .onnx, .safetensors, .pt file or a run dir)")
    return resolve_artifact(source, ARTIFACT_KINDS, allow_incomplete=allow_incomplete)


def open_runner(source: str, what: str = "model", *, allow_incomplete: bool = False) -> EmbeddingRunner:
    """The runner for a file (.onnx, .safetensors, .pt, .pth) or a run dir."""
    artifact = resolve_model_file(source, what, allow_incomplete=allow_incomplete)
    path = Path(artifact.path)
    if path.suffix.lower() == ".onnx":
        return OnnxRunner(path, artifact.sha256)
    if path.suffix.lower() in (".param", ".xml", ".tflite"):     # ncnn, OpenVINO, TFLite
        from shrinkcli.evaluate.deploy_runner import DeployRunner

        return DeployRunner(path, artifact.sha256)
    if path.suffix.lower() in (".safetensors", ".pt", ".pth", ".ckpt", ".bin"):
        return TorchRunner(path, artifact.sha256)
    raise BadInputError(f"{what} {path}: unknown file type {path.suffix or '(none)'}",
                        hint="use a .onnx, .safetensors, .pt, .pth, .param (ncnn), .xml (OpenVINO) or .tflite file, or a run dir")
