"""BYOL, Barlow Twins and VICReg: losses against their papers' formulas written out with loops
(float64), and the methods' training behaviour (target gradients, momentum, state round trip)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowlabel.config import PRETRAIN_METHODS as CONFIG_PRETRAIN_METHODS
from lowlabel.config import PretrainConfig
from lowlabel.methods.ssl import BYOL, PRETRAIN_METHODS, BarlowTwins, VICReg
from lowlabel.methods.ssl.losses import barlow_twins_loss, byol_loss, vicreg_loss


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_config_names_every_registered_method_and_each_has_a_section():
    assert set(CONFIG_PRETRAIN_METHODS) == set(PRETRAIN_METHODS)
    for name, method in PRETRAIN_METHODS.items():
        assert method.name == name
        assert name in PretrainConfig.model_fields, f"pretrain.{name} has no config section"


def test_byol_loss_is_the_normalised_mse():
    p, z = randn(5, 4, seed=1), randn(5, 4, seed=2)
    want = sum(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum().item() for i in range(5)) / 5
    assert byol_loss(p, z).item() == pytest.approx(want, rel=1e-12)


def test_byol_loss_sends_no_gradient_into_the_target():
    p, z = randn(3, 4, seed=1).requires_grad_(), randn(3, 4, seed=2).requires_grad_()
    byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


def barlow_reference(z1, z2, lam, eps=1e-5):
    """Eq. 1 of Zbontar et al. with C_ij = sum_b z1n_bi z2n_bj / N, each dimension standardised
    over the batch (biased variance + eps, as the authors' BatchNorm1d(affine=False))."""
    n, d = z1.shape

    def standardised(z, j):
        col = [z[b, j].item() for b in range(n)]
        mean = sum(col) / n
        var = sum((x - mean) ** 2 for x in col) / n
        return [(x - mean) / math.sqrt(var + eps) for x in col]

    a = [standardised(z1, j) for j in range(d)]
    b = [standardised(z2, j) for j in range(d)]
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][k] * b[j][k] for k in range(n)) / n
            total += (1 - c) ** 2 if i == j else lam * c**2
    return total


@pytest.mark.parametrize("lam", [0.0051, 0.5])
def test_barlow_twins_loss_matches_its_formula(lam):
    z1, z2 = randn(7, 4, seed=3), randn(7, 4, seed=4)
    assert barlow_twins_loss(z1, z2, lam).item() == pytest.approx(barlow_reference(z1, z2, lam), rel=1e-10)


def test_barlow_twins_loss_is_zero_for_identical_decorrelated_views():
    # Standardised orthogonal columns: C is the identity, both terms vanish.
    basis = randn(8, 8, seed=5)
    basis[:, 0] = 1.0
    q, _ = torch.linalg.qr(basis)
    z = q[:, 1:4]  # orthogonal to q[:, 0], the constant vector: zero-mean, uncorrelated columns
    assert barlow_twins_loss(z, z, 0.5).item() == pytest.approx(0.0, abs=1e-4)


def vicreg_reference(z1, z2, lam, mu, nu, eps=1e-4):
    """Bardes et al.: s = mean squared difference (their Algorithm 1's F.mse_loss); v(Z) = 1/d sum_j
    max(0, 1 - sqrt(Var(z_j) + eps)) with the unbiased variance; c(Z) = 1/d sum_{i != j} Cov(Z)_ij^2."""
    n, d = z1.shape
    s = sum((z1[b, j].item() - z2[b, j].item()) ** 2 for b in range(n) for j in range(d)) / (n * d)

    def column(z, j):
        return [z[b, j].item() for b in range(n)]

    def cov(z, i, j):
        a, b = column(z, i), column(z, j)
        ma, mb = sum(a) / n, sum(b) / n
        return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (n - 1)

    def v(z):
        return sum(max(0.0, 1 - math.sqrt(cov(z, j, j) + eps)) for j in range(d)) / d

    def c(z):
        return sum(cov(z, i, j) ** 2 for i in range(d) for j in range(d) if i != j) / d

    return lam * s + mu * (v(z1) + v(z2)) + nu * (c(z1) + c(z2)), (s, v(z1) + v(z2), c(z1) + c(z2))


@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 3.0, 0.5)])
def test_vicreg_loss_matches_its_formula(weights):
    # Small spread, so the variance hinge is active on some dimensions and not on others.
    z1, z2 = randn(6, 5, seed=6) * torch.tensor([0.3, 2.0, 0.5, 1.5, 0.1], dtype=torch.float64), randn(6, 5, seed=7)
    loss, terms = vicreg_loss(z1, z2, *weights)
    want, (s, v, c) = vicreg_reference(z1, z2, *weights)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert [terms["invariance"].item(), terms["variance"].item(), terms["covariance"].item()] == pytest.approx([s, v, c], rel=1e-10)


def test_losses_keep_float64_and_lift_half_precision():
    z = randn(6, 3, seed=8)
    assert barlow_twins_loss(z, z, 0.1).dtype == torch.float64
    assert vicreg_loss(z.bfloat16(), z.bfloat16())[0].dtype == torch.float32


def tiny_encoder():
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())


def test_byol_target_gets_no_gradient_and_follows_the_cosine_momentum_to_one():
    torch.manual_seed(0)
    byol = BYOL(tiny_encoder(), 8, proj_hidden_dim=8, proj_dim=4, pred_hidden_dim=8, momentum=0.9)
    views = [randn(5, 6, seed=1).float(), randn(5, 6, seed=2).float()]
    byol(views)["loss"].backward()
    assert all(p.grad is None for p in byol.momentum_branch.parameters())
    assert all(p.grad is not None for p in byol.predictor.parameters())
    target = [p.clone() for p in byol.momentum_branch.parameters()]
    online = [p.detach().clone() for m in (byol.encoder, byol.projector) for p in m.parameters()]
    byol.on_train_step_end(step=1, total_steps=10)  # first step: tau = tau_base
    assert byol.current_momentum == pytest.approx(0.9)
    for new, old, q in zip(byol.momentum_branch.parameters(), target, online):
        assert torch.allclose(new, 0.9 * old + 0.1 * q)
    assert byol.momentum_at(10, 10) == pytest.approx(1.0)  # the paper: tau ends at 1
    assert byol.momentum_at(5, 10) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 2) + 1) / 2)


@pytest.mark.parametrize("method", ["byol", "barlowtwins", "vicreg"])
def test_state_round_trip_continues_the_same_training(method):
    """A resumed run (state_dict into a fresh model) takes the same next step as the original."""

    def build():
        torch.manual_seed(0)
        kwargs = {"proj_hidden_dim": 8, "proj_dim": 4} | ({"pred_hidden_dim": 8} if method == "byol" else {})
        return PRETRAIN_METHODS[method](tiny_encoder(), 8, **kwargs).double()

    views = [randn(6, 6, seed=1), randn(6, 6, seed=2)]
    first = build()
    opt = torch.optim.SGD([p for p in first.parameters() if p.requires_grad], lr=0.1)
    for step in (1, 2):
        opt.zero_grad()
        first(views)["loss"].backward()
        opt.step()
        first.on_train_step_end(step, 4)
    resumed = build()
    resumed.load_state_dict(first.state_dict())
    assert first(views)["loss"].item() == resumed(views)["loss"].item()


def test_barlow_twins_and_vicreg_train_the_encoder():
    for method in (BarlowTwins(tiny_encoder(), 8, proj_hidden_dim=8, proj_dim=4), VICReg(tiny_encoder(), 8, proj_hidden_dim=8, proj_dim=4)):
        method([randn(5, 6, seed=1).float(), randn(5, 6, seed=2).float()])["loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.encoder.parameters())


def test_rotnet_shows_each_image_in_four_rotations_and_classifies_them():
    from lowlabel.methods.ssl.rotnet import rotated_batch

    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float64).reshape(2, 1, 3, 3)
    images, labels = rotated_batch(x)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # 90 degrees counter-clockwise: the top row becomes the left column, read bottom-up.
    assert images[2, 0].tolist() == [[2.0, 5.0, 8.0], [1.0, 4.0, 7.0], [0.0, 3.0, 6.0]]
    assert torch.equal(images[5], x[1].flip(-1).flip(-2))  # 180 degrees
    torch.manual_seed(0)
    rot = PRETRAIN_METHODS["rotnet"](nn.Sequential(nn.Flatten(), nn.Linear(9, 8)), 8, hidden_dim=8).double()
    out = rot([x])
    logits = rot.head(rot.encoder(images))
    assert out["loss"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-12)
    assert rot.num_views == 1


def test_min_steps_adds_whole_epochs_to_small_data_only():
    from lowlabel.train.pretrain import epochs_for

    assert epochs_for(2, 200, 117) == 2  # Fashion-MNIST's 30k base images at batch 256: unchanged
    assert epochs_for(2, 200, 15) == 14  # a 4k-image folder: 31 steps would be almost no training
    assert epochs_for(5, 0, 3) == 5
