"""MixMatch (Berthelot et al. 2019): guess labels of unlabeled images by averaging the model's
predictions over K weak views and sharpening, then mixup everything with everything.

Labeled images (one-hot targets) and the K views of the unlabeled ones (the sharpened guess,
K times) are mixed with a shuffle of the whole lot, ``lambda' = max(lambda, 1 - lambda)`` so each
mixed image stays closest to its own. Loss: soft cross-entropy on the mixed labeled part plus
``lambda_u`` (linear ramp-up) x the mean squared error between the guesses and the predicted
probabilities on the mixed unlabeled part. The guesses carry no gradient. One forward over the
mixed labeled and unlabeled images together, so BatchNorm sees them as one batch (the paper's
interleaving serves the same end across GPUs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.methods.semisup.base import SemisupMethod, unlabeled_report
from lowlabel.methods.semisup.losses import linear_rampup, sharpen
from lowlabel.methods.semisup.mixing import mix_targets, mixup, soft_cross_entropy, torch_seeded_rng


def guess_labels(model: nn.Module, views: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """``Sharpen(mean_k softmax(model(u_k)), T)``, without gradient."""
    with torch.no_grad():
        probs = torch.stack([torch.softmax(model(v).float(), dim=1) for v in views]).mean(0)
    return sharpen(probs, temperature)


def mixmatch_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    u_weak: torch.Tensor,
    u_strong: torch.Tensor,
    u_true: torch.Tensor,
    temperature: float,
    mix_alpha: float,
    lambda_u: float,
    rampup_fraction: float,
    step: int,
    total_steps: int,
    **_,
) -> dict[str, torch.Tensor]:
    """``u_weak`` and ``u_strong`` are the K = 2 weak views of the unlabeled batch."""
    views = [u_weak, u_strong]
    guess = guess_labels(model, views, temperature)
    num_classes = guess.shape[1]
    images = torch.cat([x, *views])
    targets = torch.cat([F.one_hot(y, num_classes).float(), guess, guess])
    rng = torch_seeded_rng()
    mixed, lam, perm = mixup(images, mix_alpha, rng, keep_larger=True)
    mixed_targets = mix_targets(targets, lam, perm)
    logits = model(mixed)
    n = len(x)
    loss_sup = soft_cross_entropy(logits[:n], mixed_targets[:n])
    loss_unsup = (torch.softmax(logits[n:].float(), dim=1) - mixed_targets[n:]).pow(2).mean()
    weight = lambda_u * linear_rampup(step, 0, int(rampup_fraction * total_steps))
    every = torch.ones(len(u_weak), device=u_weak.device)
    return {
        "loss": loss_sup + weight * loss_unsup,
        **unlabeled_report(loss_sup, loss_unsup, every, guess, u_true),
        "unsup_weight": torch.tensor(weight),
        "mix_lambda": torch.tensor(lam),
    }


MIXMATCH = SemisupMethod(mixmatch_step, uses_unlabeled=True, unlabeled_views=("weak", "weak"))
