import math

import pytest
import torch
from torch.nn import functional as F

from shrinkcli.errors import BadInputError
from shrinkcli.losses.margin import MarginHead, centre_cosines


def _cosines(head, emb):
    return F.normalize(emb, dim=1) @ F.normalize(head.weight, dim=1).T


def test_arcface_target_logit_is_s_cos_theta_plus_m_and_others_unchanged():
    torch.manual_seed(0)
    head = MarginHead(16, 10, kind="arcface")
    emb, labels = torch.randn(6, 16), torch.tensor([0, 3, 3, 9, 1, 2])
    logits, _ = head.logits(emb, labels)
    cos = _cosines(head, emb)
    theta = torch.acos(cos.gather(1, labels[:, None]).squeeze(1))
    assert (theta + 0.5 < math.pi).all()  # random vectors: no fallback branch here
    assert torch.allclose(logits.gather(1, labels[:, None]).squeeze(1), 64 * torch.cos(theta + 0.5), atol=1e-4)
    mask = torch.ones_like(cos, dtype=torch.bool).scatter(1, labels[:, None], False)
    assert torch.allclose(logits[mask], 64 * cos[mask], atol=1e-5)


def test_cosface_target_logit_is_s_times_cos_minus_m():
    torch.manual_seed(1)
    head = MarginHead(8, 5, kind="cosface", scale=30.0)
    assert head.margin == 0.35
    emb, labels = torch.randn(4, 8), torch.tensor([4, 0, 2, 2])
    logits, _ = head.logits(emb, labels)
    target = _cosines(head, emb).gather(1, labels[:, None])
    assert torch.allclose(logits.gather(1, labels[:, None]), 30 * (target - 0.35), atol=1e-4)


def test_arcface_stays_monotonic_beyond_pi_and_has_finite_gradients_at_the_poles():
    head = MarginHead(2, 2, kind="arcface", scale=1.0)
    cos = torch.linspace(-1, 1, 401, requires_grad=True)
    out = head._apply_margin(cos)
    assert (out[1:] - out[:-1] >= -1e-6).all()
    out.sum().backward()
    assert torch.isfinite(cos.grad).all()
    # below the switch point the fallback is cos - m*sin(m), not cos(theta + m)
    low = torch.tensor([-0.99])
    assert head._apply_margin(low).item() == pytest.approx(-0.99 - 0.5 * math.sin(0.5))


def test_partial_fc_keeps_every_positive_and_samples_the_rate():
    torch.manual_seed(2)
    head = MarginHead(8, 100, kind="arcface", sample_rate=0.2)
    labels = torch.tensor([5, 17, 17, 99, 42])
    chosen, remapped = head.sample_centres(labels)
    assert len(chosen) == 20 and set(labels.tolist()) <= set(chosen.tolist())
    assert torch.equal(chosen[remapped], labels)
    logits, _ = head.logits(torch.randn(5, 8), labels)
    assert logits.shape == (5, 20)
    many = torch.arange(30)  # more positives than the rate: all positives, nothing dropped
    chosen, _ = head.sample_centres(many)
    assert len(chosen) == 30
    head.eval()
    assert head.sample_centres(labels)[0] is None


def test_partial_fc_gradient_touches_only_sampled_centres():
    torch.manual_seed(3)
    head = MarginHead(8, 50, kind="cosface", sample_rate=0.1)
    labels, emb = torch.tensor([1, 2, 3]), torch.randn(3, 8)
    torch.manual_seed(7)
    chosen, _ = head.sample_centres(labels)
    torch.manual_seed(7)
    head(emb, labels).backward()
    touched = head.weight.grad.abs().sum(1).nonzero().flatten()
    assert set(touched.tolist()) <= set(chosen.tolist())


def _row_sparse_run(steps: int, *, bound: bool):
    """A linear 'backbone' + sampled CosFace head, SGD with momentum and weight decay; with `bound`
    the head updates its sampled rows itself, else a hand-written row-sparse SGD does."""
    torch.manual_seed(0)
    head, backbone = MarginHead(8, 50, kind="cosface", scale=16.0, sample_rate=0.2), torch.nn.Linear(4, 8)
    params = [backbone.weight, head.weight] if bound else [backbone.weight]
    optimizer = torch.optim.SGD([{"params": params, "weight_decay": 5e-4}, {"params": [backbone.bias]}],
                                lr=0.1, momentum=0.9)
    if bound:
        head.bind_optimizer(optimizer)
    centres, momentum = head.weight.detach().clone(), torch.zeros(50, 8)
    generator, touched = torch.Generator().manual_seed(1), []
    for _ in range(steps):
        x, y = torch.randn(6, 4, generator=generator), torch.randint(0, 50, (6,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        if bound:
            head(backbone(x), y).backward()
            optimizer.step()
            continue
        chosen, local = head.sample_centres(y)
        rows = centres[chosen].clone().requires_grad_()
        cosine = centre_cosines(backbone(x), rows)      # its own gradient: test_centre_cosines_gradient
        logits = cosine.scatter(1, local.view(-1, 1), cosine.gather(1, local.view(-1, 1)) - 0.35) * 16.0
        F.cross_entropy(logits, local).backward()
        optimizer.step()
        with torch.no_grad():
            momentum[chosen] = 0.9 * momentum[chosen] + rows.grad + 5e-4 * rows
            centres[chosen] = rows - 0.1 * momentum[chosen]
        touched.append(chosen)
    if bound:
        head.flush_rows()
        return head.weight.detach(), optimizer.state[head.weight]["momentum_buffer"], None
    return centres, momentum, touched


def test_centre_cosines_gradient_matches_autograd_through_normalised_centres():
    from shrinkcli.losses.margin import _CentreCosines

    generator = torch.Generator().manual_seed(5)
    units = F.normalize(torch.randn(5, 7, generator=generator, dtype=torch.double), dim=1).requires_grad_()
    centres = (torch.randn(9, 7, generator=generator, dtype=torch.double) * 0.01).requires_grad_()
    assert torch.autograd.gradcheck(_CentreCosines.apply, (units, centres))
    weights = torch.randn(5, 9, generator=generator, dtype=torch.double)
    (_CentreCosines.apply(units, centres) * weights).sum().backward()
    mine = units.grad.clone(), centres.grad.clone()
    units.grad = centres.grad = None
    (F.linear(units, F.normalize(centres, dim=1)) * weights).sum().backward()
    assert torch.allclose(mine[0], units.grad) and torch.allclose(mine[1], centres.grad)


def test_a_bound_sampled_head_updates_only_its_rows_and_their_momentum():
    centres, momentum, _ = _row_sparse_run(4, bound=True)
    expected_centres, expected_momentum, touched = _row_sparse_run(4, bound=False)
    assert centres.shape == momentum.shape == (50, 8)     # flushed: the full matrix and its full state
    assert torch.allclose(centres, expected_centres, atol=1e-5)
    assert torch.allclose(momentum, expected_momentum, atol=1e-5)
    untouched = sorted(set(range(50)) - set(torch.cat(touched).tolist()))
    initial, _, _ = _row_sparse_run(0, bound=False)
    assert untouched and torch.equal(centres[untouched], initial[untouched])   # no decay, no momentum
    assert not momentum[untouched].any()


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_training_with_the_head_separates_classes(kind):
    torch.manual_seed(4)
    centres = F.normalize(torch.randn(4, 16), dim=1)
    labels = torch.arange(64) % 4
    data = centres[labels] + 0.3 * torch.randn(64, 16)
    model = torch.nn.Linear(16, 16)
    head = MarginHead(16, 4, kind=kind, scale=16.0)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    first = None
    for _ in range(60):
        loss = head(model(data), labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    head.eval()
    predicted = _cosines(head, model(data)).argmax(1)
    assert (predicted == labels).float().mean() > 0.9


def test_bad_arguments_are_clear_errors():
    with pytest.raises(BadInputError, match="arcface or cosface"):
        MarginHead(8, 4, kind="sphereface")
    with pytest.raises(BadInputError, match="sample_rate"):
        MarginHead(8, 4, sample_rate=0.0)
    with pytest.raises(BadInputError, match="at least 2"):
        MarginHead(8, 1)


def test_bf16_autocast_inputs_still_compute_margins_in_fp32():
    head = MarginHead(8, 4, kind="arcface")
    emb = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = head.logits(emb.bfloat16(), torch.tensor([0, 1, 2]))
    assert logits.dtype == torch.float32


def test_a_state_dict_taken_or_loaded_mid_training_is_the_full_matrix():
    head = MarginHead(8, 50, sample_rate=0.2)
    optimizer = torch.optim.SGD([head.weight], lr=0.1, momentum=0.9)
    head.bind_optimizer(optimizer)
    head(torch.randn(4, 8), torch.tensor([1, 2, 3, 4])).backward()
    optimizer.step()
    assert head.weight.shape == (10, 8)                 # between steps: this step's sampled rows
    saved = {k: v.clone() for k, v in head.state_dict().items()}
    assert saved["weight"].shape == (50, 8) and head.weight.shape == (50, 8)
    head(torch.randn(4, 8), torch.tensor([5, 6, 7, 8])).backward()
    optimizer.step()
    head.load_state_dict(saved)
    assert torch.equal(head.weight.detach(), saved["weight"])
