"""Distillation losses and adapters against numbers worked out by hand."""

import math

import pytest
import torch

from shrinkcli.errors import BadInputError
from shrinkcli.losses.adapters import StageAdapters
from shrinkcli.losses.distill import (DistillCriterion, angular_loss, cosine_loss, get_distill_loss, l2_loss,
                                      no_loss, per_sample_cosine)



# Two samples. Sample 0: s=(3,4), t=(4,3): cos = 24/25 = 0.96, 1-cos = 0.04, (1-cos)^2 = 0.0016.
# Sample 1: s=(1,0), t=(-1,0): cos = -1, 1-cos = 2, (1-cos)^2 = 4.
STUDENT = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
TEACHER = torch.tensor([[4.0, 3.0], [-1.0, 0.0]])


def test_angular_by_hand():
    assert angular_loss(STUDENT, TEACHER).item() == pytest.approx((0.0016 + 4.0) / 2, abs=1e-6)   # 2.0008


def test_cosine_by_hand():
    assert cosine_loss(STUDENT, TEACHER).item() == pytest.approx((0.04 + 2.0) / 2, abs=1e-6)      # 1.02


def test_l2_by_hand():
    # differences (-1, 1) and (2, 0): squares 1 + 1 + 4 + 0 = 6 over 4 elements.
    assert l2_loss(STUDENT, TEACHER).item() == pytest.approx(1.5, abs=1e-6)


def test_none_is_zero_but_connected():
    s = STUDENT.clone().requires_grad_(True)
    value = no_loss(s, TEACHER)
    value.backward()
    assert value.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_stage_maps_are_flattened_per_sample_not_per_channel():
    # One sample, 2 channels of 1x2: s flattens to (1,0,0,1), t to (1,0,1,0): dot 1, norms sqrt2 -> cos 0.5.
    # (A per-channel cosine would average cos=1 and cos=0 instead, a different number.)
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    t = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])
    assert per_sample_cosine(s, t).item() == pytest.approx(0.5, abs=1e-6)
    assert angular_loss(s, t).item() == pytest.approx(0.25, abs=1e-6)
    assert cosine_loss(s, t).item() == pytest.approx(0.5, abs=1e-6)
    # l2: squared differences 0,0,1,1 over 4 elements.
    assert l2_loss(s, t).item() == pytest.approx(0.5, abs=1e-6)


def test_angular_ignores_scale_l2_does_not():
    assert angular_loss(5 * STUDENT, TEACHER).item() == pytest.approx(angular_loss(STUDENT, TEACHER).item(), abs=1e-6)
    assert l2_loss(5 * STUDENT, TEACHER).item() != pytest.approx(l2_loss(STUDENT, TEACHER).item())


def test_angular_gradient_matches_hand_derivative():
    # One sample, s=(1,0), t=(1,1): c = cos = 1/sqrt2, L = (1-c)^2,
    # dc/ds = t/(|s||t|) - c * s/|s|^2 = (1,1)/sqrt2 - (1/sqrt2)(1,0) = (0, 1/sqrt2);
    # dL/ds = -2(1-c) dc/ds = (0, -2(1-1/sqrt2)/sqrt2).
    s = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    angular_loss(s, t).backward()
    r = 1 / math.sqrt(2)
    assert s.grad[0, 0].item() == pytest.approx(0.0, abs=1e-12)
    assert s.grad[0, 1].item() == pytest.approx(-2 * (1 - r) * r, abs=1e-12)


def test_half_precision_teacher_and_zero_vectors():
    value = angular_loss(STUDENT, TEACHER.half())
    assert value.dtype == torch.float32 and value.item() == pytest.approx(2.0008, abs=1e-4)
    zero = angular_loss(torch.zeros(2, 3), torch.ones(2, 3))
    assert torch.isfinite(zero) and zero.item() == pytest.approx(1.0)


def test_shape_mismatch_and_unknown_name():
    with pytest.raises(ValueError, match="equal shapes"):
        angular_loss(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(BadInputError, match="unknown distillation loss"):
        get_distill_loss("kl")


def test_adapters_map_channels_and_pool_sizes():
    adapters = StageAdapters([4, 4, 8, 8], [8, 16, 32, 64], embedding_sizes=(16, 32))
    maps = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4), torch.randn(2, 8, 4, 4), torch.randn(2, 8, 1, 1)]
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1)]      # stage 3 differs: pooled 4x4 -> 2x2
    out = adapters(maps, sizes)
    assert [tuple(o.shape) for o in out] == [(2, 8, 8, 8), (2, 16, 4, 4), (2, 32, 2, 2), (2, 64, 1, 1)]
    assert adapters.adapt_embedding(torch.randn(2, 16)).shape == (2, 32)
    same = StageAdapters([4] * 4, [4] * 4, embedding_sizes=(16, 16))
    e = torch.randn(3, 16)
    assert torch.equal(same.adapt_embedding(e), e)


def test_pooling_before_1x1_conv_equals_pooling_after():
    conv = torch.nn.Conv2d(3, 5, 1, bias=False)
    x = torch.randn(2, 3, 8, 8)
    pool = torch.nn.functional.adaptive_avg_pool2d
    torch.testing.assert_close(conv(pool(x, (4, 4))), pool(conv(x), (4, 4)), atol=1e-5, rtol=1e-5)


def test_criterion_total_is_weighted_sum_and_reaches_adapters():
    torch.manual_seed(0)
    crit = DistillCriterion(student_channels=[4, 4, 8, 8], teacher_channels=[8, 8, 16, 16],
                            student_embedding=16, teacher_embedding=16, embed_loss="angular",
                            stage_loss="cosine", embed_weight=2.0, stage_weights=[1.0, 0.0, 0.5, 0.0])
    s_maps = [torch.randn(2, c, h, h, requires_grad=True) for c, h in ((4, 8), (4, 4), (8, 2), (8, 1))]
    t_maps = [torch.randn(2, c, h, h) for c, h in ((8, 8), (8, 4), (16, 2), (16, 1))]
    s_emb = torch.randn(2, 16, requires_grad=True)
    t_emb = torch.randn(2, 16)
    total, terms = crit(s_maps, s_emb, t_maps, t_emb)
    assert set(terms) == {"distill_emb", "distill_s1", "distill_s3"}
    expected = 2.0 * terms["distill_emb"] + 1.0 * terms["distill_s1"] + 0.5 * terms["distill_s3"]
    assert total.item() == pytest.approx(expected.item(), abs=1e-6)
    assert terms["distill_emb"].item() == pytest.approx(angular_loss(s_emb, t_emb).item(), abs=1e-6)
    total.backward()
    assert crit.adapters.stages[0][0].weight.grad is not None and crit.adapters.stages[0][0].weight.grad.abs().sum() > 0
    assert crit.adapters.stages[1][0].weight.grad is None      # weight 0: not computed at all
    assert s_maps[0].grad.abs().sum() > 0 and s_emb.grad.abs().sum() > 0
