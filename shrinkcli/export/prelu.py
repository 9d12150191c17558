"""Rewrite per-channel PReLU into operators onnxruntime runs fast, in fp32 and in int8.

onnxruntime has no fast PReLU on x86. In fp32 it runs convolutions in a blocked channel layout
(NCHWc) and has no blocked PRelu, so each PRelu node gets two layout copies of the feature map
around it; in int8 it has no integer PRelu at all, so each one is dequantized, run in fp32 and
quantized again. MobileFaceNet has 33 PReLUs, so either way they cost more than the convolutions.

Two exact rewrites of PReLU(y) for a per-channel slope `a` with every a <= 1 (trained face
networks' slopes lie in about -0.2..1.0):

    split:     PReLU(y) = a * y + ReLU((1 - a) * y)      (fp32: both scalings become blocked
                                                          depthwise 1x1 convolutions, the ReLU and
                                                          the sum fuse into them)
    residual:  PReLU(y) = y + ReLU((a - 1) * y)          (int8: one integer Mul whose output range
                                                          starts at 0 carries the ReLU, one integer Add)

A node with any slope above 1 falls back to the general identity
`a * y + (1 - a) * ReLU(y)`, exact for every slope. The results equal PReLU up to float rounding;
the export parity check confirms it on every file written.
"""

from __future__ import annotations

import numpy as np

PRELU_MODES = ("split", "residual", "native")


def _per_channel_slope(initializer) -> np.ndarray | None:
    """The slope as a [C] vector if it is a constant of shape [C, 1, 1] or [1, C, 1, 1] (per-channel on NCHW)."""
    from onnx import numpy_helper

    if initializer is None:
        return None
    slope = numpy_helper.to_array(initializer)
    if slope.ndim == 4 and slope.shape[0] == 1:
        slope = slope[0]
    # A single slope broadcast over every channel ([1, 1, 1]) is not per-channel: keep it.
    if slope.ndim == 3 and slope.shape[0] > 1 and slope.shape[1:] == (1, 1) and slope.dtype == np.float32:
        return slope.reshape(-1)
    return None


def rewrite_prelu(proto, form: str) -> int:
    """Rewrite every per-channel PRelu of `proto` in place into `form` ("split" or "residual").

    Returns how many were rewritten; PRelu nodes whose slope is not a per-channel float32 constant
    are left as they are.
    """
    from onnx import helper, numpy_helper

    if form not in ("split", "residual"):
        raise ValueError(f"unknown PReLU form {form!r}")
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    used = set(initializers) | {v.name for v in [*graph.input, *graph.output]}
    used |= {name for node in graph.node for name in [*node.input, *node.output, node.name]}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        return name

    def op(op_type: str, inputs: list[str], base: str, output: str | None = None) -> str:
        output = output or fresh(base)
        nodes.append(helper.make_node(op_type, inputs, [output], name=fresh(f"{base}_node")))
        return output

    def scaled(source: str, scale: np.ndarray, base: str) -> str:
        factor = fresh(f"{base}_factor")   # [C, 1, 1] broadcasts over NCHW per channel
        graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32).reshape(-1, 1, 1), factor))
        return op("Mul", [source, factor], base)

    nodes = []
    replaced_slopes: set[str] = set()
    rewritten = 0
    for node in graph.node:
        slope = _per_channel_slope(initializers.get(node.input[1])) if node.op_type == "PRelu" else None
        if slope is None:
            nodes.append(node)
            continue
        y, output, prefix = node.input[0], node.output[0], node.name or node.output[0]
        if slope.max() > 1.0:     # general identity: exact for any slope
            positive = op("Relu", [y], f"{prefix}_relu")
            terms = [scaled(y, slope, f"{prefix}_ay"), scaled(positive, 1.0 - slope, f"{prefix}_relu_scaled")]
        elif form == "split":
            terms = [scaled(y, slope, f"{prefix}_ay"),
                     op("Relu", [scaled(y, 1.0 - slope, f"{prefix}_by")], f"{prefix}_relu")]
        else:
            terms = [y, op("Relu", [scaled(y, slope - 1.0, f"{prefix}_my")], f"{prefix}_relu")]
        op("Add", terms, f"{prefix}_sum", output=output)
        replaced_slopes.add(node.input[1])
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        live = {name for node in graph.node for name in node.input}
        kept = [init for init in graph.initializer if init.name in live or init.name not in replaced_slopes]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return rewritten
