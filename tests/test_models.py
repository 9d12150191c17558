import warnings

import numpy as np
import pytest
import torch
from torch import nn

from shrinkcli.errors import BadInputError
from shrinkcli.models import create_model, list_models, model_family
from shrinkcli.models.summary import count_macs, count_params, describe_model, registry_table

TEACHERS = ["r18", "r34", "r50", "r90", "r100", "r200"]
STUDENTS = ["mobilefacenet", "mobilefacenet-relu", "mobilenetv1", "mobilenetv2", "mfnr"]
ALL = TEACHERS + STUDENTS


def meta_model(name, **kwargs):
    with torch.device("meta"):
        return create_model(name, **kwargs)


def test_registry_lists_every_model_with_its_family():
    assert sorted(list_models()) == sorted(ALL)
    assert all(model_family(n) == "teacher" for n in TEACHERS)
    assert all(model_family(n) == "student" for n in STUDENTS)


@pytest.mark.parametrize("name, embedding, reference_m", [
    ("mobilefacenet", 128, 0.99), ("mobilefacenet", 512, 1.20), ("r50", 512, 43.6), ("r100", 512, 65.2),
])
def test_param_counts_match_published_references(name, embedding, reference_m):
    params = count_params(meta_model(name, embedding_size=embedding)) / 1e6
    assert abs(params - reference_m) / reference_m < 0.02, params


def test_r100_fc_is_the_published_25088_to_512_layer():
    model = meta_model("r100")
    assert tuple(model.fc.weight.shape) == (512, 25088)
    assert model.fc.weight.numel() + model.fc.bias.numel() == pytest.approx(12.85e6, rel=0.01)


def test_iresnet_depths_follow_the_documented_layer_count():
    from shrinkcli.models.iresnet import IRESNET_LAYOUTS

    for name, blocks in IRESNET_LAYOUTS.items():
        model = meta_model(name)
        convs_in_blocks = sum(1 for n, m in model.named_modules()
                              if isinstance(m, nn.Conv2d) and "downsample" not in n and n != "conv1")
        weighted = 1 + convs_in_blocks + 1  # stem conv + block convs + fc
        assert weighted == 2 * sum(blocks) + 2
        # insightface's r200 layout has 198 weighted layers by this count; the name is nominal.
        assert weighted == (198 if name == "r200" else int(name[1:]))


def test_mobilefacenet_macs_match_the_paper():
    # Chen et al. report 221M MAdds at 112x112.
    assert count_macs(meta_model("mobilefacenet", embedding_size=128), 112) / 1e6 == pytest.approx(221, rel=0.02)


def test_count_macs_is_measured_from_the_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    expected = 8 * 16 * 3 * 9 + 8 * 16 * 1 * 9 + 10 * 128
    assert count_macs(model, 4) == expected


EXPECTED_STAGES_112 = {
    "mobilefacenet": [64, 64, 128, 128], "mobilefacenet-relu": [64, 64, 128, 128], "mfnr": [64, 64, 128, 128],
    "mobilenetv1": [64, 128, 256, 1024], "mobilenetv2": [16, 24, 32, 320],
    **{t: [64, 128, 256, 512] for t in TEACHERS},
}


# Teachers share one class: r18 and our own r90 stand for them (r200 is built by the table test).
@pytest.mark.parametrize("name", STUDENTS + ["r18", "r90"])
@pytest.mark.parametrize("input_size, width", [(112, 1.0), (64, 1.0), (112, 0.5), (64, 0.5)])
def test_stage_shapes_strides_2_4_8_16(name, input_size, width):
    model = meta_model(name, input_size=input_size, width=width, embedding_size=128).eval()
    out = model.forward_features(torch.zeros(2, 3, input_size, input_size, device="meta"))
    expected_channels = [max(8, round(c * width)) for c in EXPECTED_STAGES_112[name]]
    assert model.stage_channels == expected_channels
    for stage, (tensor, stride) in enumerate(zip(out.stage_maps, (2, 4, 8, 16))):
        side = input_size // stride
        assert tuple(tensor.shape) == (2, expected_channels[stage], side, side), (stage, tensor.shape)
    assert tuple(out.embedding.shape) == (2, 128)
    assert model.embedding_size == 128 and model.input_size == input_size


def test_table_rows_describe_each_model():
    rows = {r["name"]: r for r in registry_table(input_size=112)}
    assert set(rows) == set(ALL)
    assert rows["mobilefacenet"]["stages"] == "64@56 64@28 128@14 128@7"
    assert rows["r50"]["stages"] == "64@56 128@28 256@14 512@7"
    assert rows["r90"]["params (M)"] < rows["r100"]["params (M)"] and rows["r90"]["MACs (M)"] < rows["r100"]["MACs (M)"]
    assert [r["name"] for r in registry_table(64, name_filter="mobile")] == [
        "mobilefacenet-relu", "mobilefacenet", "mobilenetv2", "mobilenetv1"]   # the ReLU one lacks PReLU slopes
    assert describe_model("r18", input_size=64)["stages"] == "64@32 128@16 256@8 512@4"


@pytest.mark.parametrize("name", STUDENTS + ["r18"])
def test_channels_last_matches_nchw_and_eval_is_deterministic(name):
    torch.manual_seed(0)
    model = create_model(name, input_size=32, width=0.25, embedding_size=64).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = model.forward_features(x)
        again = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        cl = model_cl.forward_features(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(reference.embedding, again)
    assert torch.isfinite(reference.embedding).all()
    for a, b in zip([*cl.stage_maps, cl.embedding], [*reference.stage_maps, reference.embedding]):
        # Summation order differs between layouts: compare relative to the tensor's scale.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("name", ["r18", "mobilefacenet"])
def test_training_step_produces_gradients_everywhere_trainable(name):
    model = create_model(name, input_size=32, width=0.25, embedding_size=32, dropout=0.1).train()
    model(torch.randn(4, 3, 32, 32)).pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


@pytest.mark.parametrize("name", ["r18", "r200"])
def test_fresh_teachers_give_finite_eval_outputs(name):
    model = create_model(name, input_size=16, width=0.125, embedding_size=16).eval()
    with torch.no_grad():
        out = model.forward_features(torch.randn(2, 3, 16, 16))
    assert all(torch.isfinite(t).all() and t.abs().max() < 1e3 for t in [*out.stage_maps, out.embedding])


def test_iresnet_embedding_bn_scale_is_frozen_at_one():
    model = create_model("r18", input_size=32, width=0.25)
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones_like(model.features.weight))
    assert model.conv1.bias is None and model.fc.bias is not None
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)))


def insightface_r18_keys():
    """Key names of insightface arcface_torch iresnet18, written out from its module layout."""
    def bn(prefix):
        return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]

    keys = ["conv1.weight", *bn("bn1"), "prelu.weight"]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            keys += [*bn(f"{p}.bn1"), f"{p}.conv1.weight", *bn(f"{p}.bn2"), f"{p}.prelu.weight",
                     f"{p}.conv2.weight", *bn(f"{p}.bn3")]
            if block == 0:
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    keys += [*bn("bn2"), "fc.weight", "fc.bias", *bn("features")]
    return keys


def test_r18_has_insightface_key_names_and_loads_them_strictly():
    model = create_model("r18", input_size=32, width=0.25)
    assert sorted(model.state_dict()) == sorted(insightface_r18_keys())
    foreign = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    fresh = create_model("r18", input_size=32, width=0.25)
    fresh.load_state_dict(foreign, strict=True)
    assert torch.equal(fresh.layer4[0].downsample[0].weight, foreign["layer4.0.downsample.0.weight"])


def test_r18_shapes_are_insightface_shapes():
    model = meta_model("r18")
    sd = model.state_dict()
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 3, 3)
    assert tuple(sd["layer2.0.conv2.weight"].shape) == (128, 128, 3, 3)
    assert tuple(sd["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)
    assert tuple(sd["prelu.weight"].shape) == (64,)
    assert tuple(sd["fc.weight"].shape) == (512, 512 * 7 * 7)


@pytest.mark.parametrize("bad", [{"input_size": 100}, {"input_size": 8}, {"width": 0}, {"depth": 3}])
def test_bad_options_are_bad_input(bad):
    with pytest.raises(BadInputError):
        create_model("mobilefacenet", **bad)


def test_unknown_name_is_bad_input():
    with pytest.raises(BadInputError, match="unknown architecture"):
        create_model("resnet9000")


@pytest.mark.parametrize("name", ["mobilefacenet", "mfnr", "r18"])
def test_onnx_export_with_dynamic_batch_matches_torch(name, tmp_path):
    import onnxruntime

    model = create_model(name, input_size=32, width=0.25, embedding_size=32).eval()
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), str(path), input_names=["input"],
                          output_names=["embedding"], dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-3, atol=1e-4)
