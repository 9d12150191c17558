"""The PReLU split for onnxruntime's blocked kernels: same numbers, no layout round trips."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from _helpers import calibrated_model
from shrinkcli.errors import BadInputError
from shrinkcli.export.check import generated_pixels
from shrinkcli.export.onnx_export import GraphSpec, export_onnx, read_metadata, to_onnx_proto
from shrinkcli.export.prelu import split_prelu

SIZE = 32


def run_graph(path, inputs: np.ndarray, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized=None):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if optimized:
        options.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


@pytest.fixture(scope="module")
def student():
    model = calibrated_model("mobilefacenet", input_size=SIZE, width=0.5)
    with torch.no_grad():   # slopes of a trained net: negative, small, above one
        generator = torch.Generator().manual_seed(3)
        for module in model.modules():
            if isinstance(module, nn.PReLU):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 2.0 - 0.5)
    return model


def test_split_graph_computes_the_same_embeddings(student, tmp_path):
    spec = GraphSpec(input_size=SIZE)
    native = export_onnx(student, tmp_path / "native.onnx", spec, prelu="native")
    split = export_onnx(student, tmp_path / "split.onnx", spec, prelu="split")
    assert read_metadata(native)["prelu"] == "native" and read_metadata(split)["prelu"] == "split"
    ops = collections.Counter(node.op_type for node in onnx.load(str(split)).graph.node)
    prelus = sum(isinstance(m, nn.PReLU) for m in student.modules())
    assert ops["PRelu"] == 0 and ops["Relu"] == prelus and ops["BatchNormalization"] == 2 * prelus
    inputs = spec.graph_input(generated_pixels(6, SIZE, seed=1))
    a, b = run_graph(native, inputs), run_graph(split, inputs)
    with torch.no_grad():
        reference = student.eval()(torch.from_numpy(inputs)).numpy()
    scale = np.abs(reference).max()
    assert np.abs(a - reference).max() <= 1e-4 * scale and np.abs(b - reference).max() <= 1e-4 * scale


def test_split_graph_keeps_the_blocked_layout(student, tmp_path):
    # The point of the split: onnxruntime no longer reorders the layout around every activation.
    spec = GraphSpec(input_size=SIZE)
    inputs = spec.graph_input(generated_pixels(2, SIZE, seed=2))
    reorders = {}
    for mode in ("native", "split"):
        path = export_onnx(student, tmp_path / f"{mode}.onnx", spec, prelu=mode)
        optimized = tmp_path / f"{mode}.optimized.onnx"
        run_graph(path, inputs, optimized=optimized)
        ops = collections.Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
        reorders[mode] = ops["ReorderInput"] + ops["ReorderOutput"]
    if reorders["native"] == 0:
        pytest.skip("this CPU's onnxruntime uses no blocked (NCHWc) layout: nothing to compare")
    assert reorders["split"] <= 2 < reorders["native"], reorders


def test_only_per_channel_slopes_are_split():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.PReLU(16), nn.Conv2d(16, 16, 1), nn.PReLU())
    model.input_size, model.embedding_size = 8, 0
    proto = to_onnx_proto(model, GraphSpec(input_size=8))
    assert split_prelu(proto) == 1
    assert [n.op_type for n in proto.graph.node].count("PRelu") == 1    # the shared scalar slope stays
    onnx.checker.check_model(proto)


def test_unknown_prelu_mode_is_refused(student, tmp_path):
    with pytest.raises(BadInputError, match="prelu must be one of"):
        export_onnx(student, tmp_path / "x.onnx", GraphSpec(input_size=SIZE), prelu="fast")
