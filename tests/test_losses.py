"""Losses against straightforward reference computations (float64, loops, the formula)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lowlabel.methods.semisup.losses import (
    fairness_loss,
    masked_cross_entropy,
    pseudo_labels,
    self_adaptive_thresholds,
)
from lowlabel.methods.ssl.losses import nt_xent_loss


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """The paper's formula, written out: 2N anchors, each against the other 2N-1 views."""
    z = torch.cat([z1, z2]).double()
    n = z1.shape[0]
    total = 0.0
    for a in range(2 * n):
        p = (a + n) % (2 * n)
        sim = lambda i, j: (z[i] @ z[j] / (z[i].norm() * z[j].norm())).item()  # noqa: E731
        denom = sum(math.exp(sim(a, k) / t) for k in range(2 * n) if k != a)
        total += -math.log(math.exp(sim(a, p) / t) / denom)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_nt_xent_matches_formula(temperature):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert nt_xent_loss(z1, z2, temperature).item() == pytest.approx(nt_xent_reference(z1, z2, temperature), rel=1e-10)


def test_nt_xent_is_low_for_aligned_views_and_symmetric():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 16, generator=g, dtype=torch.float64)
    aligned = nt_xent_loss(z, z + 1e-3, 0.1).item()
    shuffled = nt_xent_loss(z, z[torch.randperm(8, generator=g)], 0.1).item()
    assert aligned < shuffled
    a, b = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    assert nt_xent_loss(a, b, 0.5).item() == pytest.approx(nt_xent_loss(b, a, 0.5).item(), rel=1e-12)


def test_pseudo_labels_threshold_and_mask():
    probs = torch.tensor([[0.96, 0.02, 0.02], [0.5, 0.3, 0.2], [0.01, 0.01, 0.98], [0.2, 0.75, 0.05]])
    labels, mask = pseudo_labels(probs, threshold=0.95)
    assert labels.tolist() == [0, 0, 2, 1]
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    # Threshold is inclusive (>=), as in FixMatch's `max_probs.ge(threshold)`.
    _, mask_eq = pseudo_labels(torch.tensor([[0.75, 0.25]]), threshold=0.75)
    assert mask_eq.item() == 1.0


def test_pseudo_labels_with_a_threshold_per_class():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.45, 0.1, 0.45]])
    # Each sample is held to its own argmax's bar: class 0 at 0.5, class 1 at 0.75, class 2 at 0.8.
    labels, mask = pseudo_labels(probs, torch.tensor([0.5, 0.75, 0.8]))
    assert labels.tolist() == [0, 1, 2, 0]
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_self_adaptive_thresholds_by_hand():
    # tau(c) = tau_g * p(c) / max p: the most-predicted class gets tau_g, the others less.
    out = self_adaptive_thresholds(torch.tensor(0.8), torch.tensor([0.5, 0.25, 0.25]))
    assert torch.allclose(out, torch.tensor([0.8, 0.4, 0.4]))


def test_fairness_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last sample is not selected
    class_probs, label_hist = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.6, 0.4, 0.0])
    probs = torch.softmax(logits[:3], dim=1)
    # Strong-view argmax over the selected samples: classes 0, 1, 1 -> histogram (1/3, 2/3, 0).
    batch = probs.mean(0) * torch.tensor([3.0, 1.5, 0.0], dtype=torch.float64)  # 1/h, 0 where h = 0
    batch = batch / batch.sum()
    target = torch.tensor([0.5 / 0.6, 0.3 / 0.4, 0.0], dtype=torch.float64)
    target = target / target.sum()
    expected = sum(target[c] * math.log(batch[c] + 1e-12) for c in range(3))
    assert fairness_loss(logits, mask, class_probs, label_hist).item() == pytest.approx(expected.item(), rel=1e-5)
    assert fairness_loss(logits, torch.zeros(4), class_probs, label_hist).item() == 0.0


def test_pseudo_labels_carry_no_gradient():
    probs = torch.softmax(torch.randn(4, 3, requires_grad=True), dim=1)
    labels, mask = pseudo_labels(probs, 0.5)
    assert not labels.requires_grad and not mask.requires_grad


def test_masked_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([0, 0, 1])
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    ce = [-math.log(math.exp(2) / (math.exp(2) + 1)), None, -math.log(0.5)]
    expected = (ce[0] + ce[2]) / 3  # masked samples count in the denominator (mean over all)
    assert masked_cross_entropy(logits, targets, mask).item() == pytest.approx(expected, rel=1e-12)
    assert masked_cross_entropy(logits, targets, torch.zeros(3, dtype=torch.float64)).item() == 0.0
    assert F.cross_entropy(logits, targets).item() == pytest.approx(masked_cross_entropy(logits, targets, torch.ones(3, dtype=torch.float64)).item())


def test_sharpen_by_hand():
    from lowlabel.methods.semisup.losses import sharpen

    p = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    t = 0.5
    expected = p ** (1 / t) / (p ** (1 / t)).sum()
    assert torch.allclose(sharpen(p, t), expected)
    assert torch.allclose(sharpen(p, 1.0), p)


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        ("linear", 0, 1 / 5),
        ("linear", 50, 0.5 * 0.8 + 0.2),
        ("linear", 100, 1.0),
        ("log", 50, (1 - math.exp(-2.5)) * 0.8 + 0.2),
        ("exp", 50, math.exp(-2.5) * 0.8 + 0.2),
        ("exp", 100, 1.0),
        ("none", 0, 1.0),
    ],
)
def test_tsa_threshold_at_given_steps(schedule, step, expected):
    from lowlabel.methods.semisup.losses import tsa_threshold

    assert tsa_threshold(schedule, step, 100, num_classes=5) == pytest.approx(expected)


def test_tsa_cross_entropy_drops_confident_samples():
    from lowlabel.methods.semisup.losses import tsa_cross_entropy

    logits = torch.log(torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64))
    targets = torch.tensor([0, 1, 0])
    # threshold 0.65: sample 0 (0.9) and 1 (0.7) are confident enough -> only sample 2 counts
    assert tsa_cross_entropy(logits, targets, 0.65).item() == pytest.approx(-math.log(0.6))
    assert tsa_cross_entropy(logits, targets, 1.01).item() == pytest.approx(F.cross_entropy(logits, targets).item())


def test_kl_consistency_by_hand():
    from lowlabel.methods.semisup.losses import kl_consistency, sharpen

    weak = torch.tensor([[0.9, 0.1], [0.55, 0.45]], dtype=torch.float64)
    strong = torch.log(torch.tensor([[0.7, 0.3], [0.5, 0.5]], dtype=torch.float64))
    loss, mask = kl_consistency(weak, strong, temperature=0.5, threshold=0.8)
    assert mask.tolist() == [1.0, 0.0]
    target = sharpen(torch.tensor([[0.9, 0.1]], dtype=torch.float64), 0.5)[0]
    kl = (target * (target.log() - torch.tensor([0.7, 0.3], dtype=torch.float64).log())).sum().item()
    assert loss.item() == pytest.approx(kl / 2)


def test_align_distribution_by_hand():
    from lowlabel.methods.semisup.losses import align_distribution

    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    model_mean = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    # p * (1/3) / model_mean, renormalised per row.
    raw = [[0.6 / 0.5, 0.3 / 0.3, 0.1 / 0.2], [0.2 / 0.5, 0.2 / 0.3, 0.6 / 0.2]]
    expected = torch.tensor([[v / sum(row) for v in row] for row in raw], dtype=torch.float64)
    assert torch.allclose(align_distribution(probs, model_mean).double(), expected, atol=1e-7)
    # A model that already predicts the prior is left alone; an explicit prior is used as given.
    assert torch.allclose(align_distribution(probs, torch.full((3,), 1 / 3, dtype=torch.float64)).double(), probs, atol=1e-7)
    prior = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    skewed = align_distribution(probs, torch.full((3,), 1 / 3, dtype=torch.float64), prior)
    assert torch.allclose(skewed.double(), probs * prior / (probs * prior).sum(1, keepdim=True), atol=1e-7)


def test_debias_probabilities_by_hand():
    from lowlabel.methods.semisup.losses import align_distribution, debias_probabilities

    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    # softmax(log p - tau log prior) for tau 0.4, row by row.
    raw = [[p * q ** -0.4 for p, q in zip(row, [0.5, 0.3, 0.2])] for row in [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]]
    expected = torch.tensor([[v / sum(row) for v in row] for row in raw], dtype=torch.float64)
    assert torch.allclose(debias_probabilities(probs, prior, 0.4).double(), expected, atol=1e-7)
    # tau 0 changes nothing; tau 1 is distribution alignment towards a uniform prior.
    assert torch.allclose(debias_probabilities(probs, prior, 0.0).double(), probs, atol=1e-7)
    assert torch.allclose(debias_probabilities(probs, prior, 1.0), align_distribution(probs, prior), atol=1e-7)


def test_logit_adjusted_cross_entropy_by_hand():
    import math

    from lowlabel.methods.semisup.losses import logit_adjusted_cross_entropy

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], dtype=torch.float64, requires_grad=True)
    prior = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    targets, mask = torch.tensor([0, 2]), torch.tensor([1.0, 0.0], dtype=torch.float64)
    loss = logit_adjusted_cross_entropy(logits, targets, mask, prior, 0.5)
    # Row 0 only (row 1 masked), averaged over both rows: -log softmax(z + 0.5 log prior)[0] / 2.
    adjusted = [2.0 + 0.5 * math.log(0.6), 0.5 + 0.5 * math.log(0.3), -1.0 + 0.5 * math.log(0.1)]
    expected = -(adjusted[0] - math.log(sum(math.exp(a) for a in adjusted))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # A target of the over-predicted class costs less than plain CE, one of a rare class more:
    # the raw logits the student learns are pushed away from the classes it over-predicts.
    plain = torch.nn.functional.cross_entropy(logits[:1], targets[:1]).item() / 2
    assert loss.item() < plain
    rare = logit_adjusted_cross_entropy(logits, torch.tensor([2, 2]), mask, prior, 0.5).item()
    assert rare > torch.nn.functional.cross_entropy(logits[:1], torch.tensor([2])).item() / 2
    loss.backward()
    assert logits.grad[1].abs().sum() == 0  # a masked row gets no gradient
