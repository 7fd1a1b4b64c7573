"""Pseudo-Label, Mean Teacher and the batch mixers: each against its formula, the true labels of
unlabeled images never reaching a loss, and gradients only where the papers send them."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.methods.semisup import SEMISUP_REGISTRY
from lowlabel.methods.semisup.losses import linear_rampup, sigmoid_rampup, softmax_mse
from lowlabel.methods.semisup.mixing import (
    cutmix,
    mix_targets,
    mixed_cross_entropy,
    mixup,
    soft_cross_entropy,
)


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(4, 6, generator=g),
        "y": torch.tensor([0, 1, 2, 0]),
        "u_weak": torch.randn(8, 6, generator=g),
        "u_strong": torch.randn(8, 6, generator=g),
        "u_true": torch.randint(0, 3, (8,), generator=g),
    }


# --- mixers -----------------------------------------------------------------------------------


def test_mixup_is_the_convex_combination_with_the_drawn_lambda_and_pairing():
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    mixed, lam, perm = mixup(x, 0.75, np.random.default_rng(3))
    replay = np.random.default_rng(3)
    assert lam == replay.beta(0.75, 0.75) and perm.tolist() == replay.permutation(5).tolist()
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])
    _, lam_kept, _ = mixup(x, 0.75, np.random.default_rng(3), keep_larger=True)
    assert lam_kept == max(lam, 1 - lam) >= 0.5


def test_cutmix_pastes_one_box_and_lambda_is_the_area_kept():
    x = torch.arange(2 * 10 * 10, dtype=torch.float32).reshape(2, 1, 10, 10)
    for seed in range(20):
        mixed, lam, perm = cutmix(x, 1.0, np.random.default_rng(seed))
        from_other = (mixed != x).squeeze(1)  # every pixel differs between the two images
        assert perm.tolist() in ([0, 1], [1, 0])
        if perm.tolist() == [0, 1]:  # each image paired with itself: nothing changes
            assert torch.equal(mixed, x)
            continue
        for i in range(2):
            rows, cols = from_other[i].any(1).nonzero(), from_other[i].any(0).nonzero()
            area = from_other[i].sum().item()
            if area:  # one rectangle: its bounding box is full
                assert area == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
                assert torch.equal(mixed[i][:, from_other[i]], x[perm[i]][:, from_other[i]])
            assert lam == pytest.approx(1 - area / 100)


def test_mixed_cross_entropy_equals_the_soft_cross_entropy_to_mixed_one_hot_targets():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels, perm, lam = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([5, 4, 3, 2, 1, 0]), 0.3
    soft = mix_targets(F.one_hot(labels, 4).double(), lam, perm)
    assert mixed_cross_entropy(logits, labels, lam, perm).item() == pytest.approx(soft_cross_entropy(logits, soft).item(), rel=1e-6)
    by_hand = -sum((soft[i] * torch.log_softmax(logits[i], 0)).sum().item() for i in range(6)) / 6
    assert soft_cross_entropy(logits, soft).item() == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_supervised_mixing_is_reproducible_under_the_torch_seed_and_off_by_default(mix):
    images = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    flat = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    y = torch.tensor([0, 1, 2, 0])
    plain = SEMISUP_REGISTRY["supervised"].step(flat, images, y)
    assert plain["loss"].item() == pytest.approx(F.cross_entropy(flat(images), y).item())
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(SEMISUP_REGISTRY["supervised"].step(flat, images, y, mix=mix, mix_alpha=1.0))
    assert runs[0]["loss"].item() == runs[1]["loss"].item() and runs[0]["mix_lambda"] == runs[1]["mix_lambda"]
    assert runs[0]["loss"].item() != pytest.approx(plain["loss"].item())


# --- ramps and consistency --------------------------------------------------------------------


def test_rampups_by_hand():
    assert [linear_rampup(s, 10, 30) for s in (0, 10, 20, 30, 40)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(3, 0) == 1.0


def test_softmax_mse_by_hand():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    p = torch.softmax(s, 1)
    want = sum((p[i, c] - t[i, c]).item() ** 2 for i in range(2) for c in range(3)) / 6
    assert softmax_mse(s, t).item() == pytest.approx(want)


# --- Pseudo-Label -------------------------------------------------------------------------------

PL = dict(threshold=0.4, lambda_u=3.0, rampup_start=0.1, rampup_end=0.5, total_steps=100)


def test_pseudo_label_loss_is_supervised_plus_the_ramped_masked_self_label_loss():
    model, b = toy_model(), batch()
    out = SEMISUP_REGISTRY["pseudolabel"].step(model, **b, step=30, **PL)
    logits_u = model(b["u_weak"])
    probs = torch.softmax(logits_u, 1)
    mask = (probs.max(1).values >= 0.4).float()
    unsup = (F.cross_entropy(logits_u, probs.argmax(1), reduction="none") * mask).mean()
    want = F.cross_entropy(model(b["x"]), b["y"]) + 3.0 * (30 - 10) / (50 - 10) * unsup
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    before = SEMISUP_REGISTRY["pseudolabel"].step(model, **b, step=5, **PL)  # before the ramp starts
    assert before["loss"].item() == pytest.approx(F.cross_entropy(model(b["x"]), b["y"]).item(), rel=1e-6)


@pytest.mark.parametrize("method", ["pseudolabel", "meanteacher"])
def test_swapping_unlabeled_true_labels_changes_nothing_but_the_monitor(method):
    results = []
    for shift in (0, 1):
        model, b = toy_model(), batch()
        b["u_true"] = (torch.softmax(model(b["u_weak"]), 1).argmax(1) + shift) % 3
        kwargs = PL if method == "pseudolabel" else dict(lambda_u=50.0, rampup_fraction=0.4, total_steps=100, teacher=copy.deepcopy(model).eval())
        out = SEMISUP_REGISTRY[method].step(model, **b, step=60, **kwargs)
        out["loss"].backward()
        results.append((out["loss"].item(), [p.grad.clone() for p in model.parameters()], out["pseudo_acc"].item()))
    (loss_a, grads_a, acc_a), (loss_b, grads_b, acc_b) = results
    assert loss_a == loss_b and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert acc_a != acc_b  # the monitor does see them


# --- Mean Teacher -------------------------------------------------------------------------------


def test_mean_teacher_consistency_reaches_the_student_only():
    model, b = toy_model(), batch()
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # a teacher that differs from the student, as after a few EMA steps
        for p in teacher.parameters():
            p.add_(0.3)
    out = SEMISUP_REGISTRY["meanteacher"].step(model, **b, lambda_u=50.0, rampup_fraction=0.4, step=20, total_steps=100, teacher=teacher)
    unlabeled_term = out["loss"] - F.cross_entropy(model(b["x"]), b["y"])
    student_grads = torch.autograd.grad(unlabeled_term, list(model.parameters()))
    assert all(g.abs().sum() > 0 for g in student_grads)  # the unlabeled term trains the student
    assert all(p.grad is None for p in teacher.parameters())
    with torch.no_grad():
        want = softmax_mse(model(b["u_strong"]), torch.softmax(teacher(b["u_weak"]), 1)).item()
    assert out["loss_unsup"].item() == pytest.approx(want, rel=1e-5)
    assert out["unsup_weight"].item() == pytest.approx(50.0 * math.exp(-5 * (1 - 20 / 40) ** 2))


def test_mean_teacher_needs_its_teacher():
    with pytest.raises(ValueError, match="EMA teacher"):
        SEMISUP_REGISTRY["meanteacher"].step(toy_model(), **batch(), lambda_u=1.0, rampup_fraction=0.4, step=1, total_steps=10, teacher=None)


def test_methods_ask_the_loop_for_the_views_of_their_papers():
    assert SEMISUP_REGISTRY["meanteacher"].unlabeled_views == ("weak", "weak")
    assert SEMISUP_REGISTRY["pseudolabel"].unlabeled_views == ("weak",)
    assert SEMISUP_REGISTRY["mixmatch"].unlabeled_views == ("weak", "weak")
    assert SEMISUP_REGISTRY["fixmatch"].unlabeled_views == SEMISUP_REGISTRY["flexmatch"].unlabeled_views == ("weak", "strong")
    assert [name for name, spec in SEMISUP_REGISTRY.items() if spec.uses_index] == ["flexmatch"]


# --- MixMatch -----------------------------------------------------------------------------------

MM = dict(temperature=0.5, mix_alpha=0.75, lambda_u=100.0, rampup_fraction=0.4, total_steps=100)


def test_mixmatch_guesses_are_the_sharpened_mean_over_views_without_gradient():
    from lowlabel.methods.semisup.mixmatch import guess_labels

    model, b = toy_model(), batch()
    guess = guess_labels(model, [b["u_weak"], b["u_strong"]], 0.5)
    mean = (torch.softmax(model(b["u_weak"]), 1) + torch.softmax(model(b["u_strong"]), 1)) / 2
    sharp = mean**2 / (mean**2).sum(1, keepdim=True)
    assert torch.allclose(guess, sharp, atol=1e-6) and not guess.requires_grad


def test_mixmatch_loss_by_hand():
    model, b = toy_model(), batch()
    torch.manual_seed(7)
    out = SEMISUP_REGISTRY["mixmatch"].step(model, **b, step=20, **MM)
    torch.manual_seed(7)
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
    lam, perm = rng.beta(0.75, 0.75), torch.from_numpy(rng.permutation(20))
    lam = max(lam, 1 - lam)
    with torch.no_grad():
        mean = (torch.softmax(model(b["u_weak"]), 1) + torch.softmax(model(b["u_strong"]), 1)) / 2
        guess = mean**2 / (mean**2).sum(1, keepdim=True)
        images = torch.cat([b["x"], b["u_weak"], b["u_strong"]])
        targets = torch.cat([F.one_hot(b["y"], 3).float(), guess, guess])
        logits = model(lam * images + (1 - lam) * images[perm])
        mixed = lam * targets + (1 - lam) * targets[perm]
        l_x = -(mixed[:4] * torch.log_softmax(logits[:4], 1)).sum(1).mean()
        l_u = ((torch.softmax(logits[4:], 1) - mixed[4:]) ** 2).mean()
    assert out["mix_lambda"].item() == pytest.approx(lam)
    assert out["loss"].item() == pytest.approx((l_x + 100.0 * 20 / 40 * l_u).item(), rel=1e-5)


# --- FlexMatch ----------------------------------------------------------------------------------


def test_flexmatch_thresholds_by_hand():
    from lowlabel.methods.semisup.flexmatch import flexmatch_thresholds

    selected = torch.tensor([-1, -1, 0, 0, 1, 2, 2, 2])  # sigma = (2, 1, 3), 2 never confident
    beta = torch.tensor([2 / 3, 1 / 3, 1.0])
    assert torch.allclose(flexmatch_thresholds(selected, 3, 0.9), 0.9 * beta / (2 - beta))
    # Warm-up: while most images are unused, the unused count normalises and the bars stay low.
    early = torch.tensor([-1] * 6 + [0, 1])
    assert torch.allclose(flexmatch_thresholds(early, 3, 0.9), 0.9 * torch.tensor([1 / 11, 1 / 11, 0.0]))
    assert torch.allclose(flexmatch_thresholds(early, 3, 0.9, warmup=False), 0.9 * torch.tensor([1.0, 1.0, 0.0]))
    # Nothing learned yet: every bar at 0, every pseudo-label used (the paper's start).
    assert torch.equal(flexmatch_thresholds(torch.full((5,), -1), 3, 0.9), torch.zeros(3))


def test_flexmatch_masks_with_the_record_before_the_batch_then_records_it():
    from lowlabel.methods.semisup.flexmatch import LearningEffect

    model, b = toy_model(), batch()
    effect = LearningEffect(num_unlabeled=20, num_classes=3, threshold=0.4, warmup=True)
    index = torch.arange(3, 11)
    out = SEMISUP_REGISTRY["flexmatch"].step(model, **b, u_index=index, lambda_u=1.0, learning_effect=effect)
    assert out["mask_rate"].item() == 1.0  # empty record: bars at 0
    probs = torch.softmax(model(b["u_weak"]), 1)
    confident = probs.max(1).values >= 0.4
    want = torch.full((20,), -1)
    want[index[confident]] = probs.argmax(1)[confident]
    assert torch.equal(effect.selected, want) and confident.any()


def test_flexmatch_true_labels_change_nothing_but_the_monitor():
    from lowlabel.methods.semisup.flexmatch import LearningEffect

    results = []
    for shift in (0, 1):
        model, b = toy_model(), batch()
        b["u_true"] = (torch.softmax(model(b["u_weak"]), 1).argmax(1) + shift) % 3
        effect = LearningEffect(20, 3, 0.4, True)
        effect.selected[:6] = torch.tensor([0, 1, 2, 0, 0, 1])
        out = SEMISUP_REGISTRY["flexmatch"].step(model, **b, u_index=torch.arange(8, 16), lambda_u=1.0, learning_effect=effect)
        out["loss"].backward()
        results.append((out["loss"].item(), [p.grad.clone() for p in model.parameters()], out["pseudo_acc"].item(), effect.selected.clone()))
    (loss_a, grads_a, acc_a, sel_a), (loss_b, grads_b, acc_b, sel_b) = results
    assert loss_a == loss_b and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b)) and torch.equal(sel_a, sel_b)
    assert acc_a != acc_b
