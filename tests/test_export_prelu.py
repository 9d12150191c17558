"""PReLU rewritten for onnxruntime's fp32 and int8 kernels: same numbers, faster graphs."""

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
from shrinkcli.evaluate.images import generated_pixels
from shrinkcli.export.onnx_export import GraphSpec, export_onnx, read_metadata, to_onnx_proto
from shrinkcli.export.prelu import rewrite_prelu

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


def student_with_slopes(low: float, high: float, seed: int) -> nn.Module:
    model = calibrated_model("mobilefacenet", input_size=SIZE, width=0.5)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for module in model.modules():
            if isinstance(module, nn.PReLU):
                module.weight.copy_(low + torch.rand(module.weight.shape, generator=generator) * (high - low))
    return model


@pytest.fixture(scope="module")
def student():
    """Slopes as training leaves them: small, some negative, none above one."""
    return student_with_slopes(-0.5, 1.0, seed=3)


@pytest.fixture(scope="module")
def steep_student():
    """Some slopes above one, where the fast forms do not hold and the general identity is used."""
    return student_with_slopes(-0.5, 1.5, seed=4)


def op_counts(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("mode, muls", [("split", 2), ("residual", 1)])
@pytest.mark.parametrize("steep", [False, True])
def test_rewritten_graph_computes_the_same_embeddings(student, steep_student, tmp_path, mode, muls, steep):
    model = steep_student if steep else student
    spec = GraphSpec(input_size=SIZE)
    native = export_onnx(model, tmp_path / "native.onnx", spec, prelu="native")
    rewritten = export_onnx(model, tmp_path / f"{mode}.onnx", spec, prelu=mode)
    assert read_metadata(native)["prelu"] == "native" and read_metadata(rewritten)["prelu"] == mode
    ops = op_counts(rewritten)
    prelus = sum(isinstance(m, nn.PReLU) for m in model.modules())
    assert ops["PRelu"] == 0 and ops["Relu"] == prelus
    if not steep:   # the fast forms, node for node
        assert ops["Mul"] == muls * prelus
    else:           # nodes with a slope above one take the general identity (two Muls), the rest the fast form
        assert muls * prelus <= ops["Mul"] <= 2 * prelus and (muls == 2 or ops["Mul"] > prelus)
    inputs = spec.graph_input(generated_pixels(6, SIZE, seed=1))
    a, b = run_graph(native, inputs), run_graph(rewritten, inputs)
    with torch.no_grad():
        reference = model.eval()(torch.from_numpy(inputs)).numpy()
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
        ops = op_counts(optimized)
        reorders[mode] = ops["ReorderInput"] + ops["ReorderOutput"]
    if reorders["native"] == 0:
        pytest.skip("this CPU's onnxruntime uses no blocked (NCHWc) layout: nothing to compare")
    assert reorders["split"] <= 2 < reorders["native"], reorders


def test_residual_int8_graph_keeps_every_prelu_in_integer_kernels(student, tmp_path):
    # The point of the residual form: no PReLU is dequantized to fp32 and quantized again.
    from shrinkcli.export.quantize import quantize_int8

    spec = GraphSpec(input_size=SIZE)
    calib = spec.graph_input(generated_pixels(8, SIZE, seed=5))
    prelus = sum(isinstance(m, nn.PReLU) for m in student.modules())
    float_ops = {}
    for mode in ("native", "residual"):
        source = export_onnx(student, tmp_path / f"{mode}.onnx", spec, prelu=mode)
        int8 = tmp_path / f"{mode}-int8.onnx"
        quantize_int8(source, int8, calib)
        optimized = tmp_path / f"{mode}-int8.optimized.onnx"
        run_graph(int8, calib[:2], optimized=optimized)
        ops = op_counts(optimized)
        float_ops[mode] = ops["PRelu"] + ops["Relu"] + ops["Mul"] + ops["QuantizeLinear"]
        if mode == "residual":
            assert ops["QLinearMul"] == prelus and ops["QLinearConv"] > 0, ops
    # Left in float: the input's quantization and nothing per PReLU (native: every PReLU and its requantization).
    assert float_ops["residual"] <= 2 and float_ops["native"] > prelus, float_ops


def test_only_per_channel_slopes_are_rewritten():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.PReLU(16), nn.Conv2d(16, 16, 1), nn.PReLU())
    model.input_size, model.embedding_size = 8, 0
    for form in ("split", "residual"):
        proto = to_onnx_proto(model, GraphSpec(input_size=8))
        assert rewrite_prelu(proto, form) == 1
        assert [n.op_type for n in proto.graph.node].count("PRelu") == 1    # the shared scalar slope stays
        onnx.checker.check_model(proto)


def test_unknown_prelu_mode_is_refused(student, tmp_path):
    with pytest.raises(BadInputError, match="prelu must be one of"):
        export_onnx(student, tmp_path / "x.onnx", GraphSpec(input_size=SIZE), prelu="fast")
