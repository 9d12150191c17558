"""The faster-backward PReLU: the same forward, the same gradients and the same weights as nn.PReLU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shrinkcli.models.prelu import PReLU, _PReLUFunction


@pytest.mark.parametrize("shape, channels, channels_last", [
    ((4, 6, 5, 7), 6, False), ((4, 6, 5, 7), 6, True), ((4, 6, 5, 7), 1, True), ((8, 6), 6, False)])
def test_gradients_equal_torch_prelu(shape, channels, channels_last):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    x[0, 0] = 0.0                        # the kink: PyTorch takes the slope there, so must we
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape, generator=generator)
    ours, reference = PReLU(channels), nn.PReLU(channels)
    with torch.no_grad():
        ours.weight.uniform_(-0.5, 1.5, generator=generator)
        reference.weight.copy_(ours.weight)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), reference(x_ref)
    assert y_ours.grad_fn is not None and "PReLUFunction" in type(y_ours.grad_fn).__name__   # the fast path ran
    y_ours.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(y_ours, y_ref)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-5)


def test_gradcheck_in_double_precision():
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_PReLUFunction.apply, (x, weight))


def test_inference_and_double_precision_keep_torch_kernel():
    layer = PReLU(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    double = PReLU(3).double()(x.double())
    assert "PReLUFunction" not in type(double.grad_fn).__name__


def test_state_dict_is_torch_prelu_compatible():
    ours, reference = PReLU(5), nn.PReLU(5)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(ours.state_dict())
    assert isinstance(ours, nn.PReLU)
