"""Frozen-teacher preparation: BN folding is exact in fp32 (outputs and the four stage maps)."""

import pytest
import torch
from torch.nn import functional as F

from shrinkcli.models import create_model
from shrinkcli.models.freeze import ChannelAffine, fold_batchnorm, prepare_teacher


def trained_looking(arch, **kwargs):
    """A small model whose BNs hold non-trivial statistics and affine parameters."""
    torch.manual_seed(0)
    model = create_model(arch, input_size=32, **kwargs)
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def assert_same_outputs(a, b):
    for ref, got in zip(a.stage_maps + [a.embedding], b.stage_maps + [b.embedding]):
        assert ref.shape == got.shape
        cosine = F.cosine_similarity(ref.flatten(1), got.flatten(1)).min()
        assert cosine > 1 - 1e-5
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("arch,kwargs,expected", [
    ("r18", dict(width=0.25, embedding_size=32), 23),      # 2 per block + stem + downsample + neck + features
    ("r34", dict(width=0.125, embedding_size=16), 39),
    ("mobilefacenet", dict(width=0.25, embedding_size=32), 50),
])
def test_folded_outputs_and_stage_maps_match(arch, kwargs, expected):
    model = trained_looking(arch, **kwargs)
    folded, count = fold_batchnorm(model)
    assert count == expected
    # Only the BNs in front of a padded conv are left, as fixed affines; none as BatchNorm.
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert_same_outputs(model.forward_features(x), folded.forward_features(x))
        assert_same_outputs(model.forward_features(x.contiguous(memory_format=torch.channels_last)),
                            folded.to(memory_format=torch.channels_last).forward_features(x))


def test_iresnet_keeps_the_bn_before_each_padded_conv_unfolded():
    model = trained_looking("r18", width=0.25, embedding_size=32)
    folded, _ = fold_batchnorm(model)
    block = folded.layer1[0]
    assert isinstance(block.bn1, ChannelAffine)           # bn1 -> conv1 (padding 1): not folded
    assert isinstance(block.bn2, torch.nn.Identity) and isinstance(block.bn3, torch.nn.Identity)
    assert block.conv1.bias is not None and block.conv2.bias is not None


def test_fold_leaves_the_original_and_its_parameters_alone():
    model = trained_looking("mobilefacenet", width=0.25, embedding_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batchnorm(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_prepared_teacher_on_cpu_returns_stage_maps_only_when_asked():
    model = trained_looking("r18", width=0.25, embedding_size=32)
    prepared, info = prepare_teacher(model, device="cpu", compile="auto")
    assert info == {"folded_bn": 0, "dtype": "float32", "compiled": False}   # CPU default: as loaded
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        stages, embedding = prepared(x, True)
        none, same = prepared(x, False)
        ref = model.forward_features(x)
    assert none == () and torch.equal(same, embedding) and len(stages) == 4
    assert torch.equal(embedding, ref.embedding)
    folded, info = prepare_teacher(model, device="cpu", compile="off", fold=True)
    assert info["folded_bn"] == 23
    with torch.no_grad():
        stages, embedding = folded(x, True)
    assert_same_outputs(ref, type(ref)(list(stages), embedding))


def test_compile_setting():
    from shrinkcli.models.freeze import _wants_compile

    assert _wants_compile("auto", torch.device("cuda")) and not _wants_compile("auto", torch.device("cpu"))
    assert _wants_compile("on", torch.device("cpu")) and not _wants_compile("off", torch.device("cuda"))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu.sh runs it)")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_teacher_casts_weights_once_and_matches_fp32(dtype):
    model = trained_looking("r18", width=0.25, embedding_size=32).cuda()
    prepared, info = prepare_teacher(model, device="cuda", autocast_dtype=dtype, channels_last=True, compile="off")
    assert info["dtype"] == str(dtype).replace("torch.", "") and info["folded_bn"] == 23
    assert all(p.dtype == dtype for p in prepared.parameters())
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.no_grad():
        stages, embedding = prepared(x, True)
        ref = model.forward_features(x)
    assert embedding.dtype == dtype and all(s.dtype == dtype for s in stages)
    assert F.cosine_similarity(ref.embedding, embedding.float()).min() > 0.99


@cuda
def test_cuda_compiled_teacher_matches_eager():
    model = trained_looking("r18", width=0.25, embedding_size=32).cuda()
    eager, _ = prepare_teacher(model, device="cuda", autocast_dtype=torch.bfloat16, compile="off")
    compiled, info = prepare_teacher(model, device="cuda", autocast_dtype=torch.bfloat16, compile="on")
    assert info["compiled"]
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.no_grad():
        for with_stages in (True, False):
            a, b = eager(x, with_stages)[1].float(), compiled(x, with_stages)[1].float()
            assert F.cosine_similarity(a, b).min() > 0.999
