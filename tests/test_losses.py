"""Losses in ikd_sweep.distill.losses, checked against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from ikd_sweep.distill.losses import (
    course_loss,
    hidden_state_loss,
    is_regression,
    kd_loss,
    task_loss,
)

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T_ = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]


def softmax(row, temp):
    e = [math.exp(x / temp) for x in row]
    return [x / sum(e) for x in e]


def kd_by_hand(s, t, temp):
    """T^2 * mean over rows of sum_k p_t,k * (log p_t,k - log p_s,k)."""
    total = 0.0
    for srow, trow in zip(s, t, strict=True):
        ps, pt = softmax(srow, temp), softmax(trow, temp)
        total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt, strict=True))
    return temp**2 * total / len(s)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kd_loss_matches_hand_computation(temp):
    got = kd_loss(torch.tensor(S, dtype=torch.float64), torch.tensor(T_, dtype=torch.float64), temp)
    assert got.item() == pytest.approx(kd_by_hand(S, T_, temp), rel=1e-12)


def test_kd_loss_known_number():
    # T=1. Row 1: p_s = softmax(1, 2, .5) = (.23122, .62853, .14024),
    #             p_t = softmax(2, 0, 1)  = (.66524, .09003, .24473).
    row1 = sum(
        b * math.log(b / a)
        for a, b in [(0.231224, 0.665241), (0.628532, 0.090031), (0.140244, 0.244728)]
    )
    # Row 2: uniform teacher, so KL = logsumexp(s) - mean(s) - log 3.
    row2 = math.log(math.exp(0) + math.exp(-1) + math.exp(3)) - 2 / 3 - math.log(3)
    assert (row1, row2) == pytest.approx((0.66431, 1.30060), abs=1e-5)
    got = kd_loss(torch.tensor(S), torch.tensor(T_), 1.0).item()
    assert got == pytest.approx((row1 + row2) / 2, rel=1e-5)  # batchmean: / 2 rows
    assert kd_loss(torch.tensor(S), torch.tensor(T_), 2.0).item() == pytest.approx(
        kd_by_hand(S, T_, 2.0), rel=1e-5
    )


def test_kd_loss_t2_scaling_and_batchmean():
    s, t = torch.tensor(S, dtype=torch.float64), torch.tensor(T_, dtype=torch.float64)
    kl = F.kl_div(F.log_softmax(s / 3, -1), F.softmax(t / 3, -1), reduction="sum") / 2
    assert kd_loss(s, t, 3.0).item() == pytest.approx(9 * kl.item(), rel=1e-12)
    rows = [kd_loss(s[i : i + 1], t[i : i + 1], 3.0) for i in range(2)]
    assert kd_loss(s, t, 3.0).item() == pytest.approx(sum(rows).item() / 2, rel=1e-12)
    assert kd_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-12)


def test_regression_losses_are_mse():
    s = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)
    t = torch.tensor([[1.5], [2.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([1.0, 3.0, 4.0])  # float32 labels are cast to the logits' dtype
    assert is_regression(s) and not is_regression(torch.zeros(3, 2))
    assert task_loss(s, y).item() == pytest.approx((0 + 1 + 0) / 3)
    assert task_loss(s, y).dtype == torch.float64
    assert kd_loss(s, t, temperature=7.0).item() == pytest.approx((0.25 + 0 + 1) / 3)


def test_task_loss_classification_is_mean_ce():
    s = torch.tensor(S)
    y = torch.tensor([1, 2])
    want = -sum(math.log(softmax(S[i], 1.0)[int(y[i])]) for i in range(2)) / 2
    assert task_loss(s, y).item() == pytest.approx(want, rel=1e-6)


def test_course_loss_alpha_mixing():
    s, t, y = torch.tensor(S), torch.tensor(T_), torch.tensor([1, 2])
    kd, ce = kd_loss(s, t, 2.0), task_loss(s, y)
    mix = lambda a: course_loss(s, t, y, temperature=2.0, alpha=a).item()  # noqa: E731
    assert mix(0.0) == pytest.approx(ce.item())
    assert mix(1.0) == pytest.approx(kd.item())
    assert mix(0.3) == pytest.approx(0.3 * kd.item() + 0.7 * ce.item())


def _hidden(n_layers, b=2, seq=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, seq, d, generator=g, dtype=torch.float64) for _ in range(n_layers + 1)]


@pytest.mark.parametrize(
    "lt, pairs", [(4, [(1, 2), (2, 4)]), (3, [(1, 2), (2, 3)]), (2, [(1, 1), (2, 2)])]
)
def test_hidden_state_loss_layer_mapping(lt, pairs):
    student = _hidden(2)
    teacher = [torch.full_like(student[0], 1e3) for _ in range(lt + 1)]  # unmatched: huge
    for k, (i, j) in enumerate(pairs):
        teacher[j] = student[i] + (k + 1) * 0.5  # matched layer k: squared error (0.5(k+1))^2
    want = (0.5**2 + 1.0**2) / 2
    assert hidden_state_loss(student, teacher, None).item() == pytest.approx(want)


def test_hidden_state_loss_ignores_pads():
    student, teacher = _hidden(2), _hidden(2, seed=1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ref = hidden_state_loss(student, teacher, mask)
    garbage = [h.clone() for h in student]
    for h in garbage:
        h[mask == 0] = 1e6
    assert hidden_state_loss(garbage, teacher, mask).item() == pytest.approx(ref.item())
    m = mask[..., None].double()
    want = sum(((student[i] - teacher[i]) ** 2 * m).sum() / (m.sum() * 3) for i in (1, 2)) / 2
    assert ref.item() == pytest.approx(want.item())


def test_hidden_state_loss_needs_equal_sizes():
    with pytest.raises(ValueError, match="needs equal hidden sizes; got 64 vs 384"):
        hidden_state_loss(_hidden(2, d=64), _hidden(4, d=384), None)


def test_course_loss_adds_hidden_term():
    s, t, y = torch.tensor(S), torch.tensor(T_), torch.tensor([1, 2])
    hs, ht = _hidden(2, seq=3), _hidden(2, seq=3, seed=1)
    base = course_loss(s, t, y, temperature=2.0, alpha=0.5)
    full = course_loss(
        s, t, y, temperature=2.0, alpha=0.5, student_hidden=hs, teacher_hidden=ht, hidden_weight=0.2
    )
    assert full.item() == pytest.approx(base.item() + 0.2 * hidden_state_loss(hs, ht, None).item())
    with pytest.raises(ValueError, match="output_hidden_states"):
        course_loss(s, t, y, temperature=2.0, alpha=0.5, hidden_weight=0.2)
