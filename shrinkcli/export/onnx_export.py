"""Torch -> ONNX: one self-contained file with a dynamic batch axis and deployment metadata.

The graph input is `input` and the output `embedding`. With `include_preprocess` the graph takes
uint8 images and normalises them itself, so a deployment cannot get (x - mean) / std wrong -- the
most common cause of "ONNX differs from PyTorch" reports.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from shrinkcli import __version__, log
from shrinkcli.atomic import atomic_write_bytes
from shrinkcli.errors import BadInputError

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
MIN_OPSET = 17
# protobuf cannot serialise a single message over 2 GiB; none of our models come close.
_PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class GraphSpec:
    """What an exported graph expects as input and returns as output."""

    input_size: int
    mean: float = 127.5
    std: float = 127.5
    include_preprocess: bool = False
    layout: str = "nchw"            # of the uint8 input when include_preprocess; float input is NCHW
    normalize_output: bool = False
    channel_order: str = "RGB"

    @property
    def input_layout(self) -> str:
        return self.layout if self.include_preprocess else "nchw"

    def graph_input(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB NCHW images -> the array this graph takes (uint8 in its layout, or normalised float32)."""
        if self.include_preprocess:
            return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1) if self.layout == "nhwc" else pixels)
        return ((pixels.astype(np.float32) - self.mean) / self.std).astype(np.float32)


class DeployWrapper(nn.Module):
    """The module that is exported: [cast + normalise] -> backbone -> [L2 normalise]."""

    def __init__(self, backbone: nn.Module, spec: GraphSpec):
        super().__init__()
        self.backbone = backbone
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.include_preprocess:
            x = x.to(torch.float32)
            if spec.layout == "nhwc":
                x = x.permute(0, 3, 1, 2)
            x = (x - spec.mean) / spec.std
        y = self.backbone(x)
        if spec.normalize_output:
            y = F.normalize(y, p=2.0, dim=1)
        return y


def example_input(spec: GraphSpec, batch: int = 2) -> torch.Tensor:
    size = spec.input_size
    if not spec.include_preprocess:
        return torch.randn(batch, 3, size, size)
    shape = (batch, size, size, 3) if spec.layout == "nhwc" else (batch, 3, size, size)
    return torch.randint(0, 256, shape, dtype=torch.uint8)


def build_metadata(model, spec: GraphSpec, *, dtype: str = "fp32", source_sha256: str | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The metadata_props every exported graph carries (all values are strings, as ONNX requires)."""
    props = {
        "architecture": str(getattr(model, "arch", type(model).__name__)),
        "arch_kwargs": json.dumps(getattr(model, "arch_kwargs", {}), sort_keys=True),
        "embedding_size": str(getattr(model, "embedding_size", "")),
        "input_size": str(spec.input_size),
        "mean": repr(float(spec.mean)),
        "std": repr(float(spec.std)),
        "channel_order": spec.channel_order,
        "layout": spec.input_layout,
        "input_dtype": "uint8" if spec.include_preprocess else "float32",
        "preprocess_in_graph": str(spec.include_preprocess).lower(),
        "l2_normalized": str(spec.normalize_output).lower(),
        "dtype": dtype,
        "shrink_version": __version__,
        "source_sha256": source_sha256 or "",
    }
    for key, value in (extra or {}).items():
        props[key] = value if isinstance(value, str) else json.dumps(value)
    return props


def set_metadata(proto, props: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _to_proto_dynamo(wrapper, example, opset: int):
    batch = torch.export.Dim("batch", min=1, max=65536)
    # The exporter reports progress on stdout, which `--json` reserves for the result, and warns
    # about optional torchvision ops that face models never use.
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(), _quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (example,), dynamo=True, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: batch},), optimize=True, verbose=False)
    return program.model_proto


def _to_proto_torchscript(wrapper, example, opset: int):
    import io

    import onnx

    buffer = io.BytesIO()
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def to_onnx_proto(model, spec: GraphSpec, *, opset: int = 18, exporter: str = "auto"):
    """The fp32 ONNX ModelProto of `model` wrapped per `spec`, weights embedded (no external data)."""
    if opset < MIN_OPSET:
        raise BadInputError(f"opset {opset} is too old", hint=f"use --set opset={MIN_OPSET} or newer")
    if spec.layout not in ("nchw", "nhwc"):
        raise BadInputError(f"preprocess_layout must be nchw or nhwc, got {spec.layout!r}")
    # A private float32, contiguous, eval-mode copy: the caller's model (possibly channels_last) is untouched.
    backbone = copy.deepcopy(model).float().eval().to(memory_format=torch.contiguous_format)
    wrapper = DeployWrapper(backbone, spec).eval()
    example = example_input(spec)
    proto = None
    with torch.no_grad():
        if exporter in ("auto", "dynamo"):
            try:
                proto = _to_proto_dynamo(wrapper, example, opset)
            except Exception as exc:  # noqa: BLE001 - the TorchScript exporter is the documented fallback
                if exporter == "dynamo":
                    raise
                log.warning(f"torch.export-based ONNX export failed ({type(exc).__name__}: {str(exc)[:200]}); "
                            "falling back to the TorchScript exporter")
        if proto is None:
            proto = _to_proto_torchscript(wrapper, example, opset)
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:    # a converter that falls back to another opset must not go unnoticed
        raise BadInputError(f"the ONNX exporter wrote opset {written}, not the requested {opset}",
                            hint="use the default --set opset=18, or an opset this torch can export")
    strip_debug_info(proto)
    return proto


def strip_debug_info(proto) -> None:
    """Drop per-node stack traces and doc strings: they hold local source paths and are ~40% of a small file."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    proto.graph.doc_string = ""


def save_proto(proto, path: str | Path) -> Path:
    """Serialise as ONE file (weights inline) atomically; never leaves a stray .onnx.data."""
    import onnx

    data = proto.SerializeToString()
    if len(data) > _PROTOBUF_LIMIT:
        raise BadInputError(f"model is {len(data) / 2**30:.1f} GiB, over ONNX's 2 GiB single-file limit")
    onnx.checker.check_model(proto)
    return atomic_write_bytes(path, data)


def export_onnx(model, path: str | Path, spec: GraphSpec, *, opset: int = 18, source_sha256: str | None = None,
                extra_metadata: dict[str, Any] | None = None, exporter: str = "auto", prelu: str = "split",
                graph=None) -> Path:
    """Export `model` to `path` (fp32) with metadata; returns the path.

    `prelu="split"` rewrites per-channel PReLU for onnxruntime's fp32 CPU kernels, "residual" for
    its int8 ones (see shrinkcli.export.prelu); "native" keeps the PRelu operator for runtimes that
    fuse it. `graph`, the ModelProto `to_onnx_proto(model, spec)` returned, writes several forms
    from one export (the torch exporter takes seconds); it is copied, not changed.
    """
    import onnx

    from shrinkcli.export.prelu import PRELU_MODES, rewrite_prelu

    if prelu not in PRELU_MODES:
        raise BadInputError(f"prelu must be one of {', '.join(PRELU_MODES)}, got {prelu!r}")
    if graph is None:
        proto = to_onnx_proto(model, spec, opset=opset, exporter=exporter)
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(graph)
    rewritten = rewrite_prelu(proto, prelu) if prelu != "native" else 0
    set_metadata(proto, build_metadata(model, spec, dtype="fp32", source_sha256=source_sha256,
                                       extra={**(extra_metadata or {}), "prelu": prelu if rewritten else "native"}))
    return save_proto(proto, path)
