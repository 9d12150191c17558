"""Building the ONNX teachers the ONNX-import tests read: nothing is downloaded.

IResNets are exported the way arcface_torch's `torch2onnx.py` does (`torch.onnx.export` of the model
in eval mode, input named "data", opset 11), which already folds each conv's BatchNorm into it;
`bn="present"` keeps every BatchNormalization node instead, and `fold_bn` folds them afterwards the way
a graph simplifier does (Conv followed by BatchNormalization -> Conv with bias).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch


def trained_looking(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics, affine terms and PReLU slopes: a fresh model's unit BNs and zeroed residual
    scales would make a folded BN and a missing one indistinguishable."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=generator) * (hi - lo) + lo

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                n = module.num_features
                module.running_mean.copy_(uniform(n, -0.2, 0.2))
                module.running_var.copy_(uniform(n, 0.5, 2.0))
                module.weight.copy_(uniform(n, 0.3, 1.0))
                module.bias.copy_(uniform(n, -0.2, 0.2))
            elif isinstance(module, torch.nn.PReLU):
                module.weight.copy_(uniform(module.weight.shape, 0.05, 0.4))
        for name, module in model.named_modules():
            if name.endswith(".bn3"):   # residual branches on a trained scale: deep nets stay finite
                module.weight.copy_(uniform(module.num_features, 0.02, 0.1))
    return model.eval()


def export_onnx(model: torch.nn.Module, path: Path, *, opset: int = 11, bn: str = "folded",
                input_name: str = "data", batch: int | None = None, dynamic_size: bool = False) -> Path:
    """arcface_torch-style export; `batch` fixes the batch dimension (default dynamic)."""
    size = model.input_size
    example = torch.randn(batch or 1, 3, size, size)
    axes = {} if batch else {input_name: {0: "batch"}}
    if dynamic_size:
        axes.setdefault(input_name, {}).update({2: "height", 3: "width"})
    training = torch.onnx.TrainingMode.PRESERVE if bn == "present" else torch.onnx.TrainingMode.EVAL
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), example, buffer, input_names=[input_name], opset_version=opset,
                          dynamo=False, keep_initializers_as_inputs=False, training=training,
                          dynamic_axes=axes or None)
    Path(path).write_bytes(buffer.getvalue())
    return Path(path)


def count_ops(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def fold_bn(source: Path, target: Path) -> Path:
    """Conv -> BatchNormalization pairs become one Conv with bias (w * s, (b - mean) * s + beta), exactly
    what onnxsim / onnxruntime's fusions do."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(source))
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def value(name):
        while name in alias:
            name = alias[name]
        return numpy_helper.to_array(inits[name]).astype(np.float64)

    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    drop = []
    for node in list(graph.node):
        if node.op_type != "Conv" or len(users.get(node.output[0], [])) != 1:
            continue
        bn = users[node.output[0]][0]
        if bn.op_type != "BatchNormalization":
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (value(n) for n in bn.input[1:5])
        scale = gamma / np.sqrt(var + eps)
        weight = value(node.input[1]) * scale[:, None, None, None]
        bias = value(node.input[2]) if len(node.input) > 2 else np.zeros_like(mean)
        bias = (bias - mean) * scale + beta
        w_name, b_name = node.output[0] + "_folded_w", node.output[0] + "_folded_b"
        graph.initializer.extend([numpy_helper.from_array(weight.astype(np.float32), w_name),
                                  numpy_helper.from_array(bias.astype(np.float32), b_name)])
        del node.input[1:]
        node.input.extend([w_name, b_name])
        node.output[0] = bn.output[0]
        drop.append(bn)
    for bn in drop:
        graph.node.remove(bn)
    onnx.save(proto, str(target))
    return Path(target)


def onnxsim_simplify(source: Path, target: Path) -> Path:
    import onnx
    import onnxsim

    simplified, ok = onnxsim.simplify(onnx.load(str(source)))
    assert ok, "onnxsim could not validate its simplified graph"
    onnx.save(simplified, str(target))
    return Path(target)
