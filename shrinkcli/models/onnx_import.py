"""ONNX teachers: an insightface IResNet graph mapped onto the registry's IResNet, anything else run as is.

insightface's model packs and arcface_torch's exporter (`torch.onnx.export`, opset 11) give graphs
whose node and initializer names carry no module names, and where graph simplifiers (or the
exporter itself, in eval mode) have folded each BatchNormalization that follows a convolution into
the convolution's weights and bias. So the IResNet is recognised by its structure alone, walking from
the input: stem Conv [BN] PRelu; per block BN Conv [BN] PRelu Conv [BN] + (identity or a 1x1 stride-2
Conv [BN]); then BN, Flatten/Reshape, Gemm/MatMul [BN]. The blocks per stage (a projection shortcut
starts each stage) give the depth, the convolution shapes the width, the fc input the input size.

Mapping is exact: a BN that is present is copied (its epsilon moved into the running variance when it
is not 1e-5); a BN folded into its convolution becomes an identity BN (mean 0, variance 1 - eps, scale
1) whose bias is the convolution's bias; a convolution bias in front of a present BN shifts that BN's
running mean. A parity check then proves torch reproduces the ONNX model before the teacher is used.

A graph that is not such an IResNet (a MobileFaceNet, a vendor model, an unknown depth) becomes an
embedding-only teacher run by onnxruntime (`shrinkcli.models.onnx_teacher`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from shrinkcli import log
from shrinkcli.errors import BadInputError, GateFailedError

MIN_PARITY_COSINE = 0.9999
PARITY_IMAGES = 16
TORCH_BN_EPS = 1e-5


class NotIResNet(Exception):
    """The graph does not have the insightface IResNet structure (the message says where)."""


class _Graph:
    """Producers, consumers and constant values of a graph, seen through Identity nodes
    (exporters share equal-valued initializers through Identity, e.g. every default PReLU slope)."""

    def __init__(self, proto):
        from onnx import numpy_helper

        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        self.alias: dict[str, str] = {}
        self.consumers: dict[str, list] = defaultdict(list)
        for node in proto.graph.node:
            if node.op_type == "Constant":
                value = next((a for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.consts[node.output[0]] = numpy_helper.to_array(value.t)
                continue
            if node.op_type == "Identity":
                self.alias[node.output[0]] = node.input[0]
                continue
            for name in node.input:
                if name:
                    self.consumers[self.canon(name)].append(node)
        self.output = self.canon(proto.graph.output[0].name)

    def canon(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def const(self, name: str, what: str) -> np.ndarray:
        value = self.consts.get(self.canon(name))
        if value is None:
            raise NotIResNet(f"{what} is computed, not a stored weight")
        return np.asarray(value, dtype=np.float64)

    def users(self, tensor: str) -> list:
        return self.consumers.get(self.canon(tensor), [])

    def sole_user(self, tensor: str, ops: tuple[str, ...], where: str):
        users = self.users(tensor)
        if len(users) != 1 or users[0].op_type not in ops:
            found = ", ".join(u.op_type for u in users) or "nothing"
            raise NotIResNet(f"{where}: expected {'/'.join(ops)}, found {found}")
        return users[0]


def _attr(node, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _conv(g: _Graph, node, kernel: int, strides: tuple[int, ...], where: str) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(weight, bias or None, stride) of a plain square convolution with 'same' padding."""
    weight = g.const(node.input[1], f"{where} weight")
    bias = g.const(node.input[2], f"{where} bias") if len(node.input) > 2 and node.input[2] else None
    stride = list(_attr(node, "strides", [1, 1]))
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    if (weight.ndim != 4 or weight.shape[2:] != (kernel, kernel) or _attr(node, "group", 1) != 1
            or list(_attr(node, "dilations", [1, 1])) != [1, 1] or len(set(stride)) != 1 or stride[0] not in strides
            or pads != [kernel // 2] * 4 or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        raise NotIResNet(f"{where}: not a {kernel}x{kernel} convolution of the IResNet layout")
    return weight, bias, stride[0]


def _bn_params(g: _Graph, node, where: str) -> dict[str, Any]:
    if _attr(node, "training_mode", 0) or sum(1 for o in node.output if o) > 1:
        raise NotIResNet(f"{where}: BatchNormalization in training mode")
    names = ("weight", "bias", "running_mean", "running_var")
    params = {k: g.const(node.input[i + 1], f"{where} {k}") for i, k in enumerate(names)}
    params["eps"] = float(_attr(node, "epsilon", 1e-5))
    return params


def _optional_bn(g: _Graph, tensor: str, where: str) -> tuple[dict | None, str]:
    users = g.users(tensor)
    if len(users) == 1 and users[0].op_type == "BatchNormalization":
        return _bn_params(g, users[0], where), users[0].output[0]
    return None, tensor


def _bn_state(prefix: str, channels: int, bn: dict | None, conv_bias: np.ndarray | None) -> dict[str, np.ndarray]:
    """State of torch BatchNorm `prefix` (eps 1e-5) that computes exactly what the graph does there."""
    if bn is None:   # folded away: identity BN that adds the convolution's bias
        bias = conv_bias if conv_bias is not None else np.zeros(channels)
        state = {"weight": np.ones(channels), "bias": bias, "running_mean": np.zeros(channels),
                 "running_var": np.full(channels, 1.0 - TORCH_BN_EPS)}
    else:
        mean = bn["running_mean"] - (conv_bias if conv_bias is not None else 0.0)   # BN(y + c) = BN_{mean - c}(y)
        var = bn["running_var"] + bn["eps"] - TORCH_BN_EPS
        if np.all(var > 0):
            state = {"weight": bn["weight"], "bias": bn["bias"], "running_mean": mean, "running_var": var}
        else:     # an epsilon smaller than torch's on a near-zero variance: keep the affine map it computes
            scale = bn["weight"] / np.sqrt(bn["running_var"] + bn["eps"])
            state = {"weight": scale, "bias": bn["bias"] - mean * scale, "running_mean": np.zeros(channels),
                     "running_var": np.full(channels, 1.0 - TORCH_BN_EPS)}
    if any(np.shape(v) != (channels,) for v in state.values()):
        raise NotIResNet(f"{prefix}: BatchNormalization has {np.shape(state['weight'])} values for {channels} channels")
    out = {f"{prefix}.{k}": np.asarray(v, dtype=np.float32) for k, v in state.items()}
    out[f"{prefix}.num_batches_tracked"] = np.zeros((), dtype=np.int64)
    return out


def _prelu(g: _Graph, node, channels: int, where: str) -> np.ndarray:
    slope = g.const(node.input[1], f"{where} slope").reshape(-1)
    if slope.size == 1:
        slope = np.full(channels, slope[0])
    if slope.size != channels:
        raise NotIResNet(f"{where}: PReLU has {slope.size} slopes for {channels} channels")
    return slope.astype(np.float32)


def _conv_bn(g: _Graph, node, kernel: int, strides: tuple[int, ...], conv_key: str, bn_key: str,
             state: dict, folded: list) -> tuple[str, int, int]:
    """Conv [BN] into `state`; (output tensor, out channels, stride)."""
    weight, bias, stride = _conv(g, node, kernel, strides, conv_key)
    bn, out = _optional_bn(g, node.output[0], bn_key)
    folded.append(bn is None)
    state[conv_key] = weight.astype(np.float32)
    state.update(_bn_state(bn_key, weight.shape[0], bn, bias))
    return out, weight.shape[0], stride


def _block(g: _Graph, x: str, bn1, prefix: str, state: dict, folded: list) -> tuple[str, bool]:
    """One IBasicBlock starting at tensor `x` (whose main branch opens with `bn1`); (output, has projection)."""
    conv1 = g.sole_user(bn1.output[0], ("Conv",), f"{prefix}.conv1")
    in_ch = g.const(conv1.input[1], f"{prefix}.conv1 weight").shape[1]
    state.update(_bn_state(f"{prefix}.bn1", in_ch, _bn_params(g, bn1, f"{prefix}.bn1"), None))
    t, channels, _ = _conv_bn(g, conv1, 3, (1,), f"{prefix}.conv1.weight", f"{prefix}.bn2", state, folded)
    prelu = g.sole_user(t, ("PRelu",), f"{prefix}.prelu")
    state[f"{prefix}.prelu.weight"] = _prelu(g, prelu, channels, f"{prefix}.prelu")
    conv2 = g.sole_user(prelu.output[0], ("Conv",), f"{prefix}.conv2")
    t, _, stride = _conv_bn(g, conv2, 3, (1, 2), f"{prefix}.conv2.weight", f"{prefix}.bn3", state, folded)
    add = g.sole_user(t, ("Add", "Sum"), f"{prefix} residual add")
    others = [g.canon(i) for i in add.input if g.canon(i) != g.canon(t)]
    if len(others) != 1:
        raise NotIResNet(f"{prefix}: residual add does not take the block input")
    if others[0] != g.canon(x):
        shortcut = next((u for u in g.users(x) if u.op_type == "Conv"), None)
        if shortcut is None or stride != 2:
            raise NotIResNet(f"{prefix}: shortcut is neither the identity nor a stride-2 projection")
        s_out, _, _ = _conv_bn(g, shortcut, 1, (2,), f"{prefix}.downsample.0.weight", f"{prefix}.downsample.1",
                               state, folded)
        if g.canon(s_out) != others[0]:
            raise NotIResNet(f"{prefix}: the projection shortcut does not feed the residual add")
    elif stride != 1:
        raise NotIResNet(f"{prefix}: a stride-2 block without a projection shortcut")
    if len(g.users(x)) != 2:   # bn1 and the add, or bn1 and the projection
        raise NotIResNet(f"{prefix}: its input feeds {len(g.users(x))} nodes, an IBasicBlock uses it twice")
    return add.output[0], others[0] != g.canon(x)


def _head(g: _Graph, bn, state: dict, folded: list) -> None:
    """bn2 -> Flatten/Reshape -> Gemm or MatMul[+Add] -> [features BN] -> the graph output."""
    channels = state["layer4.0.conv2.weight"].shape[0]
    state.update(_bn_state("bn2", channels, _bn_params(g, bn, "bn2"), None))
    flat = g.sole_user(bn.output[0], ("Flatten", "Reshape"), "flatten")
    if flat.op_type == "Flatten" and _attr(flat, "axis", 1) != 1:
        raise NotIResNet("flatten: not over all but the batch axis")
    if flat.op_type == "Reshape" and g.const(flat.input[1], "reshape shape").size != 2:
        raise NotIResNet("flatten: reshape to more than two axes")
    fc = g.sole_user(flat.output[0], ("Gemm", "MatMul"), "fc")
    if fc.op_type == "Gemm":
        if _attr(fc, "transA", 0):
            raise NotIResNet("fc: Gemm with a transposed input")
        weight = g.const(fc.input[1], "fc weight")
        weight = (weight if _attr(fc, "transB", 0) else weight.T) * float(_attr(fc, "alpha", 1.0))
        bias = g.const(fc.input[2], "fc bias") * float(_attr(fc, "beta", 1.0)) if len(fc.input) > 2 and fc.input[2] \
            else np.zeros(weight.shape[0])
        out = fc.output[0]
    else:
        weight = g.const(fc.input[1], "fc weight").T
        bias, out = np.zeros(weight.shape[0]), fc.output[0]
        users = g.users(out)
        if len(users) == 1 and users[0].op_type == "Add":
            add = users[0]
            bias = g.const(next(i for i in add.input if g.canon(i) != g.canon(out)), "fc bias")
            out = add.output[0]
    embedding = weight.shape[0]
    state["fc.weight"] = weight.astype(np.float32)
    state["fc.bias"] = np.broadcast_to(bias.reshape(-1), (embedding,)).astype(np.float32)
    features, out = _optional_bn(g, out, "features")
    folded.append(features is None)
    state.update(_bn_state("features", embedding, features, None))
    if g.canon(out) != g.output:
        raise NotIResNet("the embedding is not the graph's output (something follows the fc layer)")


def match_iresnet(proto, input_name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """insightface-named state_dict (float32 numpy) of an IResNet graph, and what was found; NotIResNet otherwise."""
    g = _Graph(proto)
    state: dict[str, np.ndarray] = {}
    folded: list[bool] = []
    stem = g.sole_user(input_name, ("Conv",), "stem conv")
    x, channels, _ = _conv_bn(g, stem, 3, (1,), "conv1.weight", "bn1", state, folded)
    if state["conv1.weight"].shape[1] != 3:
        raise NotIResNet("stem conv does not take 3 channels")
    prelu = g.sole_user(x, ("PRelu",), "stem prelu")
    state["prelu.weight"] = _prelu(g, prelu, channels, "stem prelu")
    x = prelu.output[0]
    blocks: list[int] = []
    while True:
        bns = [u for u in g.users(x) if u.op_type == "BatchNormalization"]
        if len(bns) != 1:
            raise NotIResNet(f"after block {sum(blocks)}: expected one BatchNormalization, found {len(bns)}")
        following = g.users(bns[0].output[0])
        if blocks and len(following) == 1 and following[0].op_type in ("Flatten", "Reshape"):
            _head(g, bns[0], state, folded)
            break
        block: dict[str, np.ndarray] = {}
        out, projected = _block(g, x, bns[0], "B", block, folded)   # the stage is known once the shortcut is
        if projected:
            if len(blocks) == 4:
                raise NotIResNet("more than four stride-2 stages")
            blocks.append(0)
        elif not blocks:
            raise NotIResNet("the first block has no projection shortcut")
        prefix = f"layer{len(blocks)}.{blocks[-1]}"
        state.update({prefix + key[1:]: value for key, value in block.items()})
        x = out
        blocks[-1] += 1
    if len(blocks) != 4:
        raise NotIResNet(f"{len(blocks)} stages, an IResNet has 4")
    return state, {"blocks": blocks, "folded_bn": int(sum(folded)), "present_bn": int(len(folded) - sum(folded))}


def build_iresnet(state: dict[str, np.ndarray], channel_order: str = "RGB"):
    """The registry IResNet holding `state` (depth and width inferred as for a backbone.pth), eval mode.

    A BGR graph gets its stem's input channels reversed, so the torch teacher takes RGB like every
    shrink model while computing exactly what the graph computes on BGR."""
    import torch

    from shrinkcli.models.io import infer_arch
    from shrinkcli.models.registry import create_model

    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}  # 0-d stays 0-d
    if channel_order == "BGR":
        tensors["conv1.weight"] = tensors["conv1.weight"].flip(1).contiguous()
    try:
        name, kwargs = infer_arch(tensors)
    except BadInputError as exc:
        raise NotIResNet(str(exc)) from exc
    model = create_model(name, **kwargs)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise NotIResNet(f"weights do not fit {name} {kwargs}: {str(exc).splitlines()[0][:120]}") from exc
    return model.eval()


def parity_check(model, session, contract, *, data: str | None = None, count: int = PARITY_IMAGES,
                 seed: int = 0) -> dict[str, Any]:
    """Torch teacher vs onnxruntime on the same images (faces from `data` when given, else generated);
    GateFailedError below MIN_PARITY_COSINE."""
    import torch

    from shrinkcli.evaluate.images import generated_pixels, parity_pixels
    from shrinkcli.evaluate.parity import parity
    from shrinkcli.models.onnx_graph import run_embeddings

    try:
        pixels, origin = parity_pixels(data, count, input_size=contract.input_size, crop=None, seed=seed)
    except BadInputError as exc:   # e.g. an unlabelled folder: the check still runs, on generated images
        log.info(f"parity check: cannot read faces from {data} ({exc}); using generated images")
        pixels, origin = generated_pixels(count, contract.input_size, seed), "generated"
    images = ((np.asarray(pixels, dtype=np.float32) - contract.mean) / contract.std).astype(np.float32)
    with torch.no_grad():
        mine = model(torch.from_numpy(images)).float().numpy()
    theirs = run_embeddings(session, contract, images)
    result = parity(mine, theirs)
    result = {"images": origin, "samples": result["samples"], "min_cosine": round(result["min_cosine"], 8),
              "mean_cosine": round(result["mean_cosine"], 8), "max_abs_diff": float(f"{result['max_abs_diff']:.3g}"),
              "max_abs_value": float(f"{float(np.abs(theirs).max()):.3g}"),   # the scale the difference is on
              "gate": MIN_PARITY_COSINE}
    log.info(f"parity torch vs onnxruntime on {result['samples']} {origin} images: min cosine "
             f"{result['min_cosine']:.6f}, max abs diff {result['max_abs_diff']:.3g} (largest value {result['max_abs_value']:.3g})")
    if not result["min_cosine"] >= MIN_PARITY_COSINE:
        raise GateFailedError(f"the IResNet mapped from the ONNX graph does not reproduce it: min cosine "
                              f"{result['min_cosine']:.6f} < {MIN_PARITY_COSINE} (max abs diff {result['max_abs_diff']:.3g})",
                              hint="the graph differs from insightface's IResNet in some detail; report the file")
    return result


def load_onnx_teacher(path: str | Path, options: dict[str, Any] | None = None, *, parity_data: str | None = None,
                      seed: int = 0):
    """(teacher model, meta) for an ONNX file: an IResNet in torch with all four stages when the graph
    is one (parity-checked), otherwise an embedding-only onnxruntime teacher. `meta` has the keys of
    `shrinkcli.models.io.load_model`'s plus `onnx` (kind, input contract, parity, what was found)."""
    from shrinkcli.atomic import sha256_file
    from shrinkcli.models.onnx_graph import make_session, read_onnx, resolve_contract
    from shrinkcli.models.onnx_teacher import OnnxEmbeddingTeacher

    onnx_file = read_onnx(path)
    contract = resolve_contract(onnx_file, options)
    info: dict[str, Any] = {"opset": onnx_file.opset, "input_name": onnx_file.input_name}
    try:
        state, found = match_iresnet(onnx_file.proto, onnx_file.input_name)
        model = build_iresnet(state, contract.channel_order)
    except NotIResNet as exc:
        model, info["not_iresnet"] = None, str(exc)
    if model is not None:
        contract = _fit_input_size(contract, onnx_file, int(model.input_size), options or {})
        info.update(kind="iresnet", **found)
        info["parity"] = parity_check(model, make_session(onnx_file), contract, data=parity_data, seed=seed)
        log.info(f"{Path(path).name}: insightface IResNet {model.arch} (blocks {found['blocks']}, "
                 f"{found['folded_bn']} BatchNorms folded into convolutions), mapped to torch with all four stages")
    else:
        model = OnnxEmbeddingTeacher(onnx_file, contract)
        info["kind"] = "embedding-only"
        log.info(f"{Path(path).name}: not an insightface IResNet ({info['not_iresnet']}); "
                 f"using it as an embedding-only teacher in onnxruntime ({model.embedding_size}-d)")
    info["contract"] = contract.to_dict()
    meta = {"arch": model.arch, "arch_kwargs": dict(model.arch_kwargs), "preprocess": contract.preprocess(),
            "sha256": sha256_file(path), "path": str(path), "metadata": onnx_file.metadata, "onnx": info}
    return model, meta


def _fit_input_size(contract, onnx_file, implied: int, options: dict[str, Any]):
    """The IResNet's fc fixes the input size; a dynamic-size graph takes it from there."""
    if contract.input_size == implied:
        return contract
    from shrinkcli.models.onnx_graph import DEFAULT_CONTRACT, _static_size

    chosen = options.get("input_size") not in (None, DEFAULT_CONTRACT["input_size"])
    if _static_size(onnx_file.input_shape) is not None or chosen or contract.source == "file metadata":
        raise BadInputError(f"{onnx_file.path}: its fc layer implies {implied}x{implied} inputs, "
                            f"not the {contract.input_size}x{contract.input_size} given",
                            hint=f"use input_size={implied}")
    contract.input_size = implied
    return contract
