"""Semi-supervised steps: the unlabeled samples' true labels never reach training."""

import copy

import pytest
import torch
from torch import nn

from lowlabel.methods.semisup import SEMISUP_REGISTRY
from lowlabel.methods.semisup.base import DistributionAlignment, PseudoLabelDebiasing, prediction_balance
from lowlabel.methods.semisup.freematch import SelfAdaptiveThreshold
from lowlabel.methods.semisup.losses import (
    align_distribution,
    debias_probabilities,
    logit_adjusted_cross_entropy,
    self_adaptive_thresholds,
)

UNLABELED_METHODS = ["fixmatch", "uda", "freematch"]


def step(method: str, *args, **kwargs):
    return SEMISUP_REGISTRY[method].step(*args, **kwargs)


def fresh_state(method: str) -> dict:
    """A new threshold module for FreeMatch (its statistics move with every call)."""
    return {"thresholds": SelfAdaptiveThreshold(3, momentum=0.9)} if method == "freematch" else {}


def toy_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(4, 6, generator=g),
        y=torch.tensor([0, 1, 2, 0]),
        u_weak=torch.randn(8, 6, generator=g),
        u_strong=torch.randn(8, 6, generator=g),
        u_true=torch.randint(0, 3, (8,), generator=g),
    )


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


WEAK_VIEW_TARGETS = {  # how the weak view's probabilities become targets, a fresh module per call
    "plain": lambda: {},
    "aligned": lambda: {"aligner": DistributionAlignment(3, 0.9)},
    "debiased": lambda: {"debiaser": PseudoLabelDebiasing(3, 0.4, 0.9)},
}


@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize(
    ("method", "targets"), [(m, t) for m in UNLABELED_METHODS for t in ("plain", "aligned")] + [("fixmatch", "debiased")]
)
def test_swapping_unlabeled_true_labels_changes_nothing_but_the_monitor(method, targets, teacher):
    kwargs = dict(threshold=0.3, lambda_u=1.0, lambda_f=0.01, temperature=0.4, tsa="linear", step=3, total_steps=10, mu=2)
    grads = []
    for shift in (0, 1):
        model = toy_model()
        batch = toy_batch(1)
        extra = {**WEAK_VIEW_TARGETS[targets](), "teacher": copy.deepcopy(model).eval() if teacher else None}
        # True labels that agree with every pseudo-label, then labels that agree with none.
        weak = torch.softmax(model(batch["u_weak"]), 1)
        for module in WEAK_VIEW_TARGETS[targets]().values():  # what a fresh module makes of this first batch
            weak = module(weak)
        batch["u_true"] = (weak.argmax(1) + shift) % 3
        out = step(method, model, **batch, **kwargs, **extra, **fresh_state(method))
        out["loss"].backward()
        grads.append((out["loss"].item(), [p.grad.clone() for p in model.parameters()], out["pseudo_acc"].item(), out["mask_rate"].item()))
    (loss_a, grads_a, acc_a, mask_a), (loss_b, grads_b, acc_b, _mask_b) = grads
    assert mask_a > 0, "the test needs some confident samples to be meaningful"
    assert loss_a == loss_b and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert (acc_a, acc_b) == (1.0, 0.0)  # only the monitor reads them


def test_fixmatch_without_confident_samples_is_supervised():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    batch = toy_batch(2)
    out = step("fixmatch", model, **batch, threshold=1.0, lambda_u=1.0)
    sup = step("supervised", model, batch["x"], batch["y"])
    assert out["mask_rate"].item() == 0.0
    assert out["loss"].item() == pytest.approx(sup["loss"].item(), rel=1e-6)


@pytest.mark.parametrize("method", UNLABELED_METHODS)
def test_a_teacher_labels_the_weak_view_and_gets_no_gradient(method):
    kwargs = dict(threshold=0.3, lambda_u=1.0, lambda_f=0.01, temperature=0.4, tsa="linear", step=3, total_steps=10)
    batch = toy_batch(3)
    # A BN-free student is its own teacher when the teacher is an exact copy: same loss and grads.
    student = toy_model()
    own = step(method, student, **batch, **kwargs, **fresh_state(method))
    own["loss"].backward()
    model, teacher = toy_model(), toy_model().eval()
    out = step(method, model, **batch, **kwargs, teacher=teacher, **fresh_state(method))
    out["loss"].backward()
    assert out["loss"].item() == pytest.approx(own["loss"].item(), rel=1e-6)
    assert all(torch.allclose(a.grad, b.grad, atol=1e-7) for a, b in zip(model.parameters(), student.parameters()))
    assert all(p.grad is None for p in teacher.parameters())
    # The weak view reaches the loss only through the teacher: another teacher, other targets.
    with torch.no_grad():
        teacher[2].weight.mul_(-1)
    other = step(method, toy_model(), **batch, **kwargs, teacher=teacher, **fresh_state(method))
    assert other["loss"].item() != pytest.approx(out["loss"].item())


def test_distribution_alignment_updates_its_mean_then_aligns():
    aligner = DistributionAlignment(3, momentum=0.9)
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1]])
    aligned = aligner(probs)
    mean = 0.9 * torch.full((3,), 1 / 3) + 0.1 * probs.mean(0)
    assert torch.allclose(aligner.model_mean, mean)
    assert torch.allclose(aligned, align_distribution(probs, mean))
    # Over-predicted class 0 loses mass in every row; the mean is saved with the state dict.
    assert (aligned[:, 0] < probs[:, 0]).all()
    restored = DistributionAlignment(3, momentum=0.9)
    restored.load_state_dict(aligner.state_dict())
    assert torch.equal(restored.model_mean, aligner.model_mean)


def test_debiasing_updates_its_prior_then_debiases_and_rides_in_the_state_dict():
    debiaser = PseudoLabelDebiasing(3, tau=0.4, momentum=0.9)
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1]])
    debiased = debiaser(probs)
    prior = 0.9 * torch.full((3,), 1 / 3) + 0.1 * probs.mean(0)
    assert torch.allclose(debiaser.prior, prior)
    assert torch.allclose(debiased, debias_probabilities(probs, prior, 0.4))
    assert (debiased[:, 0] < probs[:, 0]).all()  # the over-predicted class loses mass
    restored = PseudoLabelDebiasing(3, tau=0.4, momentum=0.9)
    restored.load_state_dict(debiaser.state_dict())
    assert torch.equal(restored.prior, debiaser.prior)


def test_fixmatch_with_debiasing_is_debiased_targets_and_a_logit_adjusted_loss():
    import torch.nn.functional as F

    batch = toy_batch(4)
    model = toy_model()
    out = step("fixmatch", model, **batch, threshold=0.4, lambda_u=1.0, debiaser=PseudoLabelDebiasing(3, 0.4, 0.9))
    # By hand: the same prior update, targets from the debiased weak view, adjusted CE on the strong view.
    with torch.no_grad():
        logits = model(torch.cat([batch["x"], batch["u_weak"], batch["u_strong"]]))
        weak = torch.softmax(logits[4:12], 1)
        prior = 0.9 * torch.full((3,), 1 / 3) + 0.1 * weak.mean(0)
        confidence, targets = debias_probabilities(weak, prior, 0.4).max(1)
        mask = (confidence >= 0.4).float()
        expected = F.cross_entropy(logits[:4], batch["y"]) + logit_adjusted_cross_entropy(logits[12:], targets, mask, prior, 0.4)
    assert 0 < mask.mean() < 1, "the test needs confident and unconfident samples"
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # tau 0 is plain FixMatch.
    plain = step("fixmatch", toy_model(), **batch, threshold=0.4, lambda_u=1.0)
    zero = step("fixmatch", toy_model(), **batch, threshold=0.4, lambda_u=1.0, debiaser=PseudoLabelDebiasing(3, 0.0, 0.9))
    assert zero["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-6)
    assert out["loss"].item() != pytest.approx(plain["loss"].item())


def test_self_adaptive_threshold_updates_then_thresholds():
    sat = SelfAdaptiveThreshold(3, momentum=0.9)
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    out = sat(probs)
    # From 1/C: tau_g <- 0.9/3 + 0.1 x mean max prob; p(c) <- 0.9/3 + 0.1 x mean p; histogram of argmaxes (2, 1, 0)/3.
    tau_g = 0.9 / 3 + 0.1 * (0.8 + 0.6 + 0.7) / 3
    class_probs = 0.9 / 3 + 0.1 * probs.mean(0)
    assert sat.global_confidence.item() == pytest.approx(tau_g)
    assert torch.allclose(sat.class_probs, class_probs)
    assert torch.allclose(sat.label_hist, 0.9 / 3 + 0.1 * torch.tensor([2 / 3, 1 / 3, 0.0]))
    assert torch.allclose(out, self_adaptive_thresholds(torch.tensor(tau_g), class_probs))
    restored = SelfAdaptiveThreshold(3, momentum=0.9)
    restored.load_state_dict(sat.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.buffers(), sat.buffers()))


def test_freematch_masks_by_its_class_thresholds():
    """A sample passes where its weak-view confidence reaches its pseudo-label's threshold."""
    model, batch = toy_model(), toy_batch(4)
    sat = SelfAdaptiveThreshold(3, momentum=0.5)
    out = step("freematch", model, **batch, lambda_u=1.0, lambda_f=0.0, thresholds=sat)
    weak = torch.softmax(model(batch["u_weak"]), 1).detach()
    thresholds = self_adaptive_thresholds(sat.global_confidence, sat.class_probs)
    expected = (weak.max(1).values >= thresholds[weak.argmax(1)]).float().mean()
    assert 0 < expected < 1, "the test needs both kinds of sample to be meaningful"
    assert out["mask_rate"].item() == pytest.approx(expected.item())


def test_prediction_balance_is_the_least_predicted_class_share_times_classes():
    def onehot_probs(labels):
        return torch.nn.functional.one_hot(torch.tensor(labels), 3).float() * 0.7 + 0.1
    # argmax counts 2, 1, 1 of 4: the rarest class has a quarter, 3/4 of its balanced third.
    assert prediction_balance(onehot_probs([0, 0, 1, 2])).item() == pytest.approx(3 * 1 / 4)
    assert prediction_balance(onehot_probs([0, 1, 2, 2, 1, 0])).item() == pytest.approx(1.0)
    assert prediction_balance(onehot_probs([0, 1, 1, 0])).item() == 0.0  # class 2 collapsed


def test_every_semisup_method_of_the_params_is_registered():
    from lowlabel.config import SEMISUP_METHODS

    assert sorted(SEMISUP_REGISTRY) == sorted(SEMISUP_METHODS)
