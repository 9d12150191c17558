"""Teacher-centre margin head: mean centres and the margin loss on fixed centres, by hand."""

import math

import pytest
import torch

from shrinkcli.errors import BadInputError
from shrinkcli.losses.centres import TeacherCentreHead, mean_embedding_centres


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_mean_centres_are_the_normalised_mean_of_normalised_embeddings():
    emb = [[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [5.0, 5.0], [0.0, -1.0]]
    labels = [0, 0, 1, 1, 2]
    got = mean_embedding_centres(torch.tensor(emb), torch.tensor(labels), 4)
    for c in range(3):
        members = [_unit(e) for e, y in zip(emb, labels) if y == c]
        mean = [sum(m[d] for m in members) / len(members) for d in range(2)]
        assert got[c].tolist() == pytest.approx(_unit(mean), abs=1e-6)
    assert got[3].abs().sum().item() == 0.0          # an identity without images has no centre
    # a large-norm image does not outweigh a small one: [2,0] and [0,3] give the diagonal
    assert got[0].tolist() == pytest.approx([math.sqrt(0.5)] * 2, abs=1e-6)


def test_fixed_centre_cosface_loss_matches_hand_computation():
    head = TeacherCentreHead(2, 2, 3, kind="cosface", margin=0.35, scale=16.0)
    centres = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    head.set_centres(centres, "test")
    emb = [[3.0, 4.0], [-1.0, 0.5]]
    labels = [1, 2]
    expected = 0.0
    for e, y in zip(emb, labels):
        cos = [_cos for _cos in (sum(a * b for a, b in zip(_unit(e), _unit(c))) for c in centres.tolist())]
        logits = [16.0 * (c - 0.35 if k == y else c) for k, c in enumerate(cos)]
        expected += -logits[y] + math.log(sum(math.exp(v) for v in logits))
    expected /= len(emb)
    loss = head(torch.tensor(emb), torch.tensor(labels))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert list(head.parameters()) == [] and not head.weight.requires_grad    # centres stay fixed


def test_centres_do_not_move_and_adapter_learns_when_sizes_differ():
    torch.manual_seed(0)
    head = TeacherCentreHead(4, 2, 5, kind="arcface", scale=8.0, sample_rate=0.6)   # PartialFC: 3 of 5
    head.set_centres(torch.nn.functional.normalize(torch.randn(5, 2), dim=1), "test")
    before = head.weight.clone()
    emb = torch.randn(6, 4, requires_grad=True)
    head.train()
    loss = head(emb, torch.tensor([0, 1, 1, 0, 0, 1]))
    loss.backward()
    assert torch.equal(head.weight, before) and head.adapter.weight.grad.abs().sum() > 0
    assert emb.grad.abs().sum() > 0 and head.num_sampled == 3


def test_centres_must_be_ready_and_the_right_shape_and_survive_a_state_dict():
    head = TeacherCentreHead(2, 2, 3)
    with pytest.raises(RuntimeError, match="not computed"):
        head(torch.randn(2, 2), torch.tensor([0, 1]))
    with pytest.raises(BadInputError, match="shape"):
        head.set_centres(torch.zeros(4, 2), "test")
    head.set_centres(torch.eye(3, 2), "test")
    again = TeacherCentreHead(2, 2, 3)
    again.load_state_dict(head.state_dict())
    assert torch.isfinite(again(torch.randn(2, 2), torch.tensor([0, 1])))
