"""Reading an ONNX face model someone else exported: what the file is, what its input expects, how to run it.

A teacher file is one self-contained graph with one float image input `[N, 3, S, S]` (N dynamic or
fixed, any input name) and one embedding output. Anything else (weights in external data files,
several outputs, a uint8 or NHWC input, a non-square input) is refused with one line that says why.

The input contract (input size, mean, std, channel order) comes from shrink's own metadata when
the file has it (written by `shrink export` and by `shrink teacher --load`), otherwise from the
options, whose defaults are the insightface convention: 112x112 RGB, (x - 127.5) / 127.5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shrinkcli.errors import BadInputError

DEFAULT_CONTRACT = {"input_size": 112, "mean": 127.5, "std": 127.5, "channel_order": "RGB"}
CHANNEL_ORDERS = ("RGB", "BGR")
# metadata keys shrink writes into every ONNX file it produces (see shrinkcli/export/onnx_export.py)
SHRINK_MARKER = "shrink_version"


@dataclass
class InputContract:
    """What the graph's input expects; `fixed_batch` is None for a dynamic batch dimension."""

    input_name: str
    input_size: int
    mean: float
    std: float
    channel_order: str
    fixed_batch: int | None
    input_dtype: str
    source: str                 # "file metadata" or "options"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def preprocess(self) -> dict[str, Any]:
        """The preprocessing a shrink model records: what the student must see (always RGB)."""
        return {"mean": self.mean, "std": self.std, "crop": None, "input_size": self.input_size,
                "channel_order": "RGB"}


@dataclass
class OnnxFile:
    path: Path
    proto: Any
    metadata: dict[str, str]
    opset: int
    input_name: str
    input_shape: list            # ints for static dims, strings (or None) for dynamic ones
    input_dtype: str
    output_name: str


_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64"}   # onnx.TensorProto element types


def read_onnx(path: str | Path) -> OnnxFile:
    """The parsed file, checked for the shape of a face-embedding graph (BadInputError otherwise)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"ONNX file {path} does not exist", hint="check the path")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf/decode errors: the file is not ONNX
        raise BadInputError(f"{path} is not a readable ONNX model: {str(exc).splitlines()[0][:160]}",
                            hint="the file is truncated or not ONNX") from exc
    tensors = list(proto.graph.initializer)
    tensors += [a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.HasField("t")]
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors):
        raise BadInputError(f"{path} keeps its weights in external data files; shrink takes one self-contained file",
                            hint="merge them: onnx.save(onnx.load(path), 'merged.onnx') (files under 2 GiB)")
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]  # old exports list weights as inputs
    if len(inputs) != 1:
        raise BadInputError(f"{path} has {len(inputs)} graph inputs ({', '.join(i.name for i in inputs)}); "
                            "a face model takes one image batch", hint="export the recognition network alone")
    if len(proto.graph.output) != 1:
        names = ", ".join(o.name for o in proto.graph.output)
        raise BadInputError(f"{path} has {len(proto.graph.output)} outputs ({names}); a teacher gives one embedding",
                            hint="export the graph with the embedding as its only output")
    graph_input = inputs[0]
    elem = graph_input.type.tensor_type.elem_type
    if elem not in _FLOAT_TYPES:
        name = onnx.TensorProto.DataType.Name(elem) if elem else "unknown"
        raise BadInputError(f"{path}: input {graph_input.name!r} is {name}, not a float image batch",
                            hint="use a graph without preprocessing inside (shrink export without include_preprocess)")
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
             for d in graph_input.type.tensor_type.shape.dim]
    _check_image_shape(path, graph_input.name, shape)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxFile(path=path, proto=proto, metadata={p.key: p.value for p in proto.metadata_props}, opset=opset,
                    input_name=graph_input.name, input_shape=shape, input_dtype=_FLOAT_TYPES[elem],
                    output_name=proto.graph.output[0].name)


def _check_image_shape(path: Path, name: str, shape: list) -> None:
    pretty = "x".join(str(d) if isinstance(d, int) else "?" for d in shape)
    if len(shape) != 4 or shape[1] != 3:
        hint = "NHWC inputs are not taken: export NCHW" if len(shape) == 4 and shape[3] == 3 else \
            "the input must be an image batch N x 3 x S x S"
        raise BadInputError(f"{path}: input {name!r} has shape {pretty}, not N x 3 x H x W", hint=hint)
    height, width = shape[2], shape[3]
    if isinstance(height, int) and isinstance(width, int) and height != width:
        raise BadInputError(f"{path}: input {name!r} is {height}x{width}; face teachers take square images",
                            hint="export the model at a square input size (112x112 for insightface)")


def _static_size(shape: list) -> int | None:
    return next((d for d in shape[2:4] if isinstance(d, int) and d > 0), None)


def _metadata_contract(onnx_file: OnnxFile) -> dict[str, Any] | None:
    meta = onnx_file.metadata
    if SHRINK_MARKER not in meta:
        return None
    contract: dict[str, Any] = {}
    try:
        if meta.get("input_size"):
            contract["input_size"] = int(meta["input_size"])
        for key in ("mean", "std"):
            if meta.get(key):
                contract[key] = float(meta[key])
    except ValueError as exc:
        raise BadInputError(f"{onnx_file.path}: shrink metadata is not numeric ({exc})",
                            hint="re-export the file with `shrink export`") from exc
    if meta.get("channel_order"):
        contract["channel_order"] = meta["channel_order"].upper()
    return contract


def resolve_contract(onnx_file: OnnxFile, options: dict[str, Any] | None = None) -> InputContract:
    """The input contract: shrink's metadata in the file, else `options`, else the insightface defaults.

    An option set to something other than its default that contradicts the file is an error:
    silently ignoring it or overriding what the exporter recorded would both train on wrong inputs."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    chosen = {k: v for k, v in options.items() if k in DEFAULT_CONTRACT and v != DEFAULT_CONTRACT[k]}
    recorded = _metadata_contract(onnx_file)
    values = {**DEFAULT_CONTRACT, **options}
    if recorded is not None:
        for key, value in chosen.items():
            if key in recorded and recorded[key] != value:
                raise BadInputError(f"{onnx_file.path} records {key}={recorded[key]} but {key}={value} was given",
                                    hint=f"drop the {key} option: the file says how it was exported")
        values.update(recorded)
    static = _static_size(onnx_file.input_shape)
    if static is not None:
        if "input_size" in chosen and chosen["input_size"] != static:
            raise BadInputError(f"{onnx_file.path} takes {static}x{static} images but input_size={chosen['input_size']} "
                                "was given", hint="drop --input-size or use a graph with a dynamic input size")
        values["input_size"] = static
    size = int(values["input_size"])
    if size <= 0 or size % 16:
        raise BadInputError(f"{onnx_file.path}: input size {size} is not a positive multiple of 16",
                            hint="face models here take 16*k pixel squares (112 for insightface)")
    order = str(values["channel_order"]).upper()
    if order not in CHANNEL_ORDERS:
        raise BadInputError(f"channel_order must be RGB or BGR, got {values['channel_order']!r}")
    if float(values["std"]) == 0:
        raise BadInputError("std must not be 0")
    batch = onnx_file.input_shape[0]
    return InputContract(input_name=onnx_file.input_name, input_size=size, mean=float(values["mean"]),
                         std=float(values["std"]), channel_order=order,
                         fixed_batch=batch if isinstance(batch, int) and batch > 0 else None,
                         input_dtype=onnx_file.input_dtype,
                         source="file metadata" if recorded is not None else "options")


def make_session(onnx_file: OnnxFile):
    """A CPU onnxruntime session, using as many threads as torch does (OMP_NUM_THREADS is honoured)."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(onnx_file.proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - unsupported op, opset, invalid graph: all bad input here
        raise BadInputError(f"onnxruntime cannot run {onnx_file.path}: {str(exc).splitlines()[0][:200]}",
                            hint="check the opset (11 or newer) and that the file runs in onnxruntime") from exc


def run_embeddings(session, contract: InputContract, images: np.ndarray) -> np.ndarray:
    """Embeddings `[N, D]` float32 of normalised RGB images `[N, 3, S, S]`, in the graph's batch size."""
    images = np.asarray(images, dtype=np.float32)
    if contract.channel_order == "BGR":
        images = images[:, ::-1]
    images = np.ascontiguousarray(images, dtype=np.dtype(contract.input_dtype))
    step = contract.fixed_batch or max(1, len(images))
    chunks = []
    for start in range(0, len(images), step):
        batch = images[start:start + step]
        count = len(batch)
        if contract.fixed_batch and count < step:       # a fixed batch dimension: pad the last chunk
            batch = np.concatenate([batch, np.zeros((step - count, *batch.shape[1:]), batch.dtype)])
        out = np.asarray(session.run(None, {contract.input_name: batch})[0])
        chunks.append(out.reshape(out.shape[0], -1)[:count] if out.ndim == 4 and out.shape[2:] == (1, 1) else out[:count])
    result = np.concatenate(chunks).astype(np.float32)
    if result.ndim != 2:
        raise BadInputError(f"the ONNX model's output has shape {list(result.shape)}, not [N, embedding]",
                            hint="export the graph with the embedding vector as its output")
    return result
