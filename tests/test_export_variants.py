"""One exported MobileFaceNet: dynamic batch, metadata, in-graph preprocessing, fp16 and int8 variants."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from _helpers import calibrated_model
from shrinkcli.evaluate.images import generated_pixels
from shrinkcli.evaluate.parity import parity
from shrinkcli.export.check import onnx_embeddings, parity_check, torch_embeddings
from shrinkcli.errors import BadInputError
from shrinkcli.export.fp16 import convert_fp16
from shrinkcli.export.onnx_export import GraphSpec, export_onnx, read_metadata
from shrinkcli.export.quantize import quantize_int8

SIZE = 32




@pytest.fixture(scope="module")
def mfn_export(tmp_path_factory):
    torch.manual_seed(0)   # the int8 bounds below hold for this network, not for every random draw
    model = calibrated_model("mobilefacenet", input_size=SIZE, width=0.25)
    spec = GraphSpec(input_size=SIZE)
    path = export_onnx(model, tmp_path_factory.mktemp("mfn") / "model.onnx", spec, source_sha256="f" * 64)
    return model, spec, path


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_dynamic_batch(mfn_export, batch):
    model, spec, path = mfn_export
    pixels = generated_pixels(batch, SIZE, seed=batch)
    out = onnx_embeddings(path, spec, pixels, batch_size=batch)
    assert out.shape == (batch, model.embedding_size)
    assert parity(torch_embeddings(model, spec, pixels), out)["min_cosine"] >= 0.99999


def test_single_file_and_metadata(mfn_export):
    model, spec, path = mfn_export
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no model.onnx.data beside it
    proto = onnx.load(str(path))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["embedding"]
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    meta = read_metadata(path)
    assert meta["architecture"] == "mobilefacenet"
    assert eval(meta["arch_kwargs"].replace("true", "True")) == {"input_size": SIZE, "width": 0.25}
    assert meta["embedding_size"] == "512" and meta["input_size"] == str(SIZE)
    assert float(meta["mean"]) == 127.5 and float(meta["std"]) == 127.5
    assert (meta["channel_order"], meta["layout"], meta["dtype"]) == ("RGB", "nchw", "fp32")
    assert (meta["preprocess_in_graph"], meta["l2_normalized"]) == ("false", "false")
    assert meta["source_sha256"] == "f" * 64 and meta["shrink_version"]


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_preprocess_in_graph_equals_torch_on_normalised_input(mfn_export, tmp_path, layout):
    model, _, _ = mfn_export
    spec = GraphSpec(input_size=SIZE, include_preprocess=True, layout=layout, normalize_output=True)
    path = export_onnx(model, tmp_path / "pre.onnx", spec)
    pixels = generated_pixels(6, SIZE, seed=3)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    feed = pixels.transpose(0, 2, 3, 1) if layout == "nhwc" else pixels
    out = session.run(None, {"input": np.ascontiguousarray(feed)})[0]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model((torch.from_numpy(pixels).float() - 127.5) / 127.5), dim=1)
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert read_metadata(path)["layout"] == layout


def test_fp16_keeps_fp32_io_and_is_close(mfn_export, tmp_path):
    model, spec, path = mfn_export
    half = convert_fp16(path, tmp_path / "m16.onnx")
    proto = onnx.load(str(half))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    result = parity_check(model, half, spec, generated_pixels(8, SIZE), variant="fp16")
    assert result["passed"], result
    assert read_metadata(half)["dtype"] == "fp16"


def test_int8_static_and_dynamic(mfn_export, tmp_path):
    model, spec, split = mfn_export
    with pytest.raises(BadInputError, match="prelu=residual"):
        quantize_int8(split, tmp_path / "refused.onnx", None)
    residual = export_onnx(model, tmp_path / "residual.onnx", spec, prelu="residual")
    native = export_onnx(model, tmp_path / "native.onnx", spec, prelu="native")
    calib = spec.graph_input(generated_pixels(16, SIZE, seed=5))
    static = quantize_int8(residual, tmp_path / "s8.onnx", calib)
    assert static == {"method": "static-qdq", "calibration_images": 16, "fp32_nodes": 3}
    assert quantize_int8(native, tmp_path / "s8-native.onnx", calib)["method"] == "static-qdq"
    dynamic = quantize_int8(residual, tmp_path / "d8.onnx", None)
    assert dynamic["method"] == "dynamic"
    pixels = generated_pixels(8, SIZE, seed=6)
    for name in ("s8.onnx", "s8-native.onnx", "d8.onnx"):
        result = parity_check(model, tmp_path / name, spec, pixels, variant="int8")
        # An untrained width-0.25 network is a harsh case for 8 bits; trained models do better.
        # Its 7-bit weights (shrinkcli.export.quantize) measured min 0.933-0.950 over four random
        # draws of this network, the int16 saturation they prevent 0.73-0.88: 0.92 tells them apart.
        assert result["min_cosine"] >= 0.92 and result["mean_cosine"] >= 0.96, (name, result)
        meta = read_metadata(tmp_path / name)
        assert meta["dtype"] == "int8" and meta["architecture"] == "mobilefacenet"
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("shrink-int8-*"))



def test_int8_kernels_agree_with_their_own_qdq_arithmetic(mfn_export, tmp_path):
    """The fused integer kernels must compute what the QDQ graph says on any x86 CPU.

    Without VNNI, u8 x s8 products are summed in int16 and saturate unless weights use 7 bits;
    running the same file unoptimised (plain dequantize -> fp32 op -> quantize) is the reference.
    """
    import onnxruntime as ort

    model, spec, _ = mfn_export
    residual = export_onnx(model, tmp_path / "residual.onnx", spec, prelu="residual")
    quantize_int8(residual, tmp_path / "s8.onnx", spec.graph_input(generated_pixels(16, SIZE, seed=5)))
    feed = spec.graph_input(generated_pixels(8, SIZE, seed=6))
    outputs = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(tmp_path / "s8.onnx"), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"input": feed})[0])
    # Measured over four random draws: 0.994-1.0 (requantisation rounding) vs 0.75-0.87 saturated.
    assert parity(outputs[1], outputs[0])["min_cosine"] >= 0.99

def test_failed_parity_is_reported(mfn_export):
    model, spec, path = mfn_export
    sabotaged = copy.deepcopy(model)
    with torch.no_grad():  # a model that no longer matches the exported graph
        first_conv = next(m for m in sabotaged.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.weight.mul_(-1.0)
    result = parity_check(sabotaged, path, spec, generated_pixels(4, SIZE), variant="fp32")
    assert not result["passed"] and result["min_cosine"] < 0.99999
    assert parity_check(model, path, spec, generated_pixels(4, SIZE), variant="fp32", min_cosine=1.01)["passed"] is False
