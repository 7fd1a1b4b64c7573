"""Semi-supervised steps: the unlabeled samples' true labels never reach training."""

import pytest
import torch
from torch import nn

from lowlabel.methods.semisup import SEMISUP_STEPS


def toy_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(4, 6, generator=g),
        y=torch.tensor([0, 1, 2, 0]),
        u_weak=torch.randn(8, 6, generator=g),
        u_strong=torch.randn(8, 6, generator=g),
        u_true=torch.randint(0, 3, (8,), generator=g),
    )


@pytest.mark.parametrize("method", ["fixmatch", "uda"])
def test_swapping_unlabeled_true_labels_changes_nothing_but_the_monitor(method):
    kwargs = dict(threshold=0.3, lambda_u=1.0, temperature=0.4, tsa="linear", step=3, total_steps=10, mu=2)
    grads = []
    for shift in (0, 1):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        batch = toy_batch(1)
        # True labels that agree with every pseudo-label, then labels that agree with none.
        batch["u_true"] = (model(batch["u_weak"]).argmax(1) + shift) % 3
        out = SEMISUP_STEPS[method](model, **batch, **kwargs)
        out["loss"].backward()
        grads.append((out["loss"].item(), [p.grad.clone() for p in model.parameters()], out["pseudo_acc"].item(), out["mask_rate"].item()))
    (loss_a, grads_a, acc_a, mask_a), (loss_b, grads_b, acc_b, mask_b) = grads
    assert mask_a > 0, "the test needs some confident samples to be meaningful"
    assert loss_a == loss_b and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert (acc_a, acc_b) == (1.0, 0.0)  # only the monitor reads them


def test_fixmatch_without_confident_samples_is_supervised():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    batch = toy_batch(2)
    out = SEMISUP_STEPS["fixmatch"](model, **batch, threshold=1.0, lambda_u=1.0)
    sup = SEMISUP_STEPS["supervised"](model, batch["x"], batch["y"])
    assert out["mask_rate"].item() == 0.0
    assert out["loss"].item() == pytest.approx(sup["loss"].item(), rel=1e-6)
