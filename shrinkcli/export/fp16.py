"""fp32 ONNX -> fp16 weights and compute, with fp32 (or uint8) graph inputs/outputs kept as they were.

Keeping the I/O types means a deployment feeds the same arrays to every variant; the casts at the
graph boundary cost nothing next to the convolutions. The conversion is onnxruntime's own
float16 converter (shipped in `onnxruntime.transformers`), so no extra dependency is needed.
"""

from __future__ import annotations

from pathlib import Path

from shrinkcli.errors import BadInputError
from shrinkcli.export.onnx_export import save_proto, set_metadata

# Ops whose fp16 versions lose accuracy or are missing on CPU execution providers; they stay fp32.
_KEEP_FP32_OPS = ["ReduceL2", "LpNormalization"]


def fp16_proto(fp32_proto):
    """A converted copy of `fp32_proto` (the input proto is not changed)."""
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:  # pragma: no cover - shipped with every onnxruntime wheel we support
        raise BadInputError("fp16 export needs onnxruntime.transformers.float16",
                            hint="install onnxruntime>=1.18") from exc
    source = onnx.ModelProto()
    source.CopyFrom(fp32_proto)
    converted = convert_float_to_float16(source, keep_io_types=True, op_block_list=_KEEP_FP32_OPS)
    # The converter appends its boundary Cast nodes at the end; ONNX requires topological order.
    _sort_topologically(converted.graph)
    return converted


def _sort_topologically(graph) -> None:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise BadInputError("fp16 conversion produced a graph with a cycle or a dangling input",
                                hint="export fp32 instead and report this model")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Write the fp16 version of the ONNX file at `fp32_path`, with metadata `dtype` set to fp16."""
    import onnx

    proto = onnx.load(str(fp32_path))
    props = {p.key: p.value for p in proto.metadata_props}
    converted = fp16_proto(proto)
    set_metadata(converted, {**props, "dtype": "fp16"})
    return save_proto(converted, out_path)
