"""Semi-supervised objectives over a classifier: each one function of a batch.

The reusable pieces (pseudo-labelling with a confidence threshold, masked cross-entropy)
live in ``losses``; the EMA teacher is timm's ``ModelEmaV3``, held by the training loop.
A method here maps (model, labeled batch, unlabeled views) to a dict of losses/stats.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.methods.losses import masked_cross_entropy, pseudo_labels


def supervised_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **_) -> dict[str, torch.Tensor]:
    """The baseline: cross-entropy on the labeled batch alone."""
    loss = F.cross_entropy(model(x), y)
    return {"loss": loss, "loss_sup": loss.detach()}


def fixmatch_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    u_weak: torch.Tensor,
    u_strong: torch.Tensor,
    u_true: torch.Tensor,
    threshold: float,
    lambda_u: float,
) -> dict[str, torch.Tensor]:
    """FixMatch (Sohn et al. 2020): CE(strong view, pseudo-label of weak view) where confident.

    ``u_true`` (the unlabeled samples' real labels, or -1) is used for monitoring only:
    it never enters a loss.
    """
    n = x.shape[0]
    # One forward over labeled + both unlabeled views, as the paper does, so BN sees them all.
    logits = model(torch.cat([x, u_weak, u_strong]))
    logits_x = logits[:n]
    logits_weak, logits_strong = logits[n:].chunk(2)
    loss_sup = F.cross_entropy(logits_x, y)
    targets, mask = pseudo_labels(logits_weak, threshold)
    loss_unsup = masked_cross_entropy(logits_strong, targets, mask)
    known = u_true >= 0
    correct = ((targets == u_true) & known).float()
    return {
        "loss": loss_sup + lambda_u * loss_unsup,
        "loss_sup": loss_sup.detach(),
        "loss_unsup": loss_unsup.detach(),
        "mask_rate": mask.mean(),
        # Of the pseudo-labels that pass the threshold, how many are right.
        "pseudo_acc": (correct * mask).sum() / (mask * known.float()).sum().clamp(min=1),
    }


SEMISUP_STEPS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "supervised": supervised_step,
    "fixmatch": fixmatch_step,
}
