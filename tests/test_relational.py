"""Similarity-preserving and EKD rank distillation against hand computations with explicit loops."""

import math

import pytest
import torch

from shrinkcli.errors import BadInputError
from shrinkcli.losses.relational import EKDLoss, RelationalTerms, similarity_preserving_loss


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _rownorm(matrix):
    return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in matrix]


STUDENT = [[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]
TEACHER = [[4.0, 3.0], [1.0, 1.0], [-1.0, 2.0]]


def test_similarity_preserving_matches_explicit_loops():
    n = len(STUDENT)
    g_s = _rownorm([[_cos(a, b) for b in STUDENT] for a in STUDENT])
    g_t = _rownorm([[_cos(a, b) for b in TEACHER] for a in TEACHER])
    expected = sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(n) for j in range(n)) / n ** 2
    got = similarity_preserving_loss(torch.tensor(STUDENT), torch.tensor(TEACHER))
    assert got.item() == pytest.approx(expected, rel=1e-5) and expected > 0.01
    # The student's cosine matrix, not its scale, is what is matched: a scaled copy of the teacher costs 0.
    assert similarity_preserving_loss(5 * torch.tensor(TEACHER), torch.tensor(TEACHER)).item() < 1e-10
    # Sizes may differ (no adapter needed): only N x N matrices are compared.
    assert similarity_preserving_loss(torch.randn(3, 7), torch.randn(3, 2)).item() >= 0


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, x))))


def test_ekd_matches_explicit_loops_with_labels():
    s = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]]
    t = [[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [0.0, 1.0]]
    labels = [0, 0, 1, 1]
    fprs, temperature = (0.5, 0.25), 0.2
    loss_fn = EKDLoss(fprs, topk=3, temperature=temperature, momentum=1.0, pos_weight=0.02, neg_weight=0.01)
    loss, logs = loss_fn(torch.tensor(s), torch.tensor(t), torch.tensor(labels))

    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]          # row-major upper triangle
    pos = [(i, j) for i, j in pairs if labels[i] == labels[j]]
    neg = [(i, j) for i, j in pairs if labels[i] != labels[j]]
    s_neg = sorted(neg, key=lambda p: -_cos(s[p[0]], s[p[1]]))
    t_neg_values = sorted((_cos(t[i], t[j]) for i, j in neg), reverse=True)
    # momentum 1: the thresholds are this batch's, at index n_neg // round(1/FPR) of the sorted negatives
    s_tau = [_cos(*(s[k] for k in s_neg[len(neg) // round(1 / f)])) for f in fprs]
    t_tau = [t_neg_values[len(neg) // round(1 / f)] for f in fprs]

    def rank(value, taus):
        return sum(_sigmoid((value - tau) / temperature) for tau in taus)

    def rank_mse(chosen):
        return sum((rank(_cos(s[i], s[j]), s_tau) - rank(_cos(t[i], t[j]), t_tau)) ** 2 for i, j in chosen) / len(chosen)

    expected_pos, expected_neg = rank_mse(pos), rank_mse(s_neg[:3])   # topk=3 hardest negatives by student
    assert logs["ekd_pos"].item() == pytest.approx(expected_pos, rel=1e-5)
    assert logs["ekd_neg"].item() == pytest.approx(expected_neg, rel=1e-5)
    assert loss.item() == pytest.approx(0.02 * expected_pos + 0.01 * expected_neg, rel=1e-5)
    assert expected_pos > 0.01 and expected_neg > 0.01
    assert loss_fn.student_thresholds.tolist() == pytest.approx(s_tau, rel=1e-6)


def test_ekd_thresholds_are_a_moving_average_and_only_update_in_training():
    loss_fn = EKDLoss((0.5,), momentum=0.01)
    s, t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    loss_fn(s, t, torch.tensor([0, 1, 2]))
    # 3 negatives: student cosines sorted 0.7071, 0.7071, 0; index 3 // 2 = 1 -> 0.7071; from 0: 0.01 * 0.7071
    assert loss_fn.student_thresholds.item() == pytest.approx(0.01 * math.sqrt(0.5), rel=1e-5)
    loss_fn.eval()
    loss_fn(s, t, torch.tensor([0, 1, 2]))
    assert loss_fn.student_thresholds.item() == pytest.approx(0.01 * math.sqrt(0.5), rel=1e-5)


def test_ekd_without_labels_treats_every_pair_as_negative():
    torch.manual_seed(0)
    s, t = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8)
    labelled = EKDLoss((0.1,), temperature=0.5, momentum=1.0)
    unlabelled = EKDLoss((0.1,), temperature=0.5, momentum=1.0)
    _, with_labels = labelled(s, t, torch.arange(6))              # all distinct: every pair negative anyway
    loss, without = unlabelled(s, t, None)
    assert without["ekd_pos"].item() == 0.0
    assert without["ekd_neg"].item() == pytest.approx(with_labels["ekd_neg"].item(), rel=1e-6)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_relational_terms_weights_and_bad_settings():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    terms = RelationalTerms(similarity_weight=3000.0)
    total, logs = terms(s, t)
    assert total.item() == pytest.approx(3000.0 * similarity_preserving_loss(s, t).item(), rel=1e-6)
    assert set(logs) == {"distill_sim"} and terms.ekd is None and terms.active
    assert not RelationalTerms().active
    with pytest.raises(BadInputError, match="ekd_fprs"):
        EKDLoss((0.0,))
