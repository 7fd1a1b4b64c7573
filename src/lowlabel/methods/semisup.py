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

from lowlabel.methods.losses import (
    kl_consistency,
    masked_cross_entropy,
    pseudo_labels,
    tsa_cross_entropy,
    tsa_threshold,
)


def supervised_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **_) -> dict[str, torch.Tensor]:
    """The baseline: cross-entropy on the labeled batch alone."""
    loss = F.cross_entropy(model(x), y)
    return {"loss": loss, "loss_sup": loss.detach()}


def _forward_three(model: nn.Module, x: torch.Tensor, u_weak: torch.Tensor, u_strong: torch.Tensor):
    # One forward over labeled + both unlabeled views, as the papers do, so BN sees them all.
    logits = model(torch.cat([x, u_weak, u_strong]))
    return logits[: len(x)], *logits[len(x) :].chunk(2)


def _pseudo_accuracy(weak_logits: torch.Tensor, u_true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Of the unlabeled samples that pass the mask, how many have the right argmax (monitor only)."""
    known = (u_true >= 0).float()
    correct = (weak_logits.detach().argmax(1) == u_true).float() * known
    return (correct * mask).sum() / (mask * known).sum().clamp(min=1)


def fixmatch_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    u_weak: torch.Tensor,
    u_strong: torch.Tensor,
    u_true: torch.Tensor,
    threshold: float,
    lambda_u: float,
    **_,
) -> dict[str, torch.Tensor]:
    """FixMatch (Sohn et al. 2020): CE(strong view, pseudo-label of weak view) where confident.

    ``u_true`` (the unlabeled samples' real labels, or -1) is used for monitoring only:
    it never enters a loss.
    """
    logits_x, logits_weak, logits_strong = _forward_three(model, x, u_weak, u_strong)
    loss_sup = F.cross_entropy(logits_x, y)
    targets, mask = pseudo_labels(logits_weak, threshold)
    loss_unsup = masked_cross_entropy(logits_strong, targets, mask)
    return {
        "loss": loss_sup + lambda_u * loss_unsup,
        "loss_sup": loss_sup.detach(),
        "loss_unsup": loss_unsup.detach(),
        "mask_rate": mask.mean(),
        "pseudo_acc": _pseudo_accuracy(logits_weak, u_true, mask),
    }


def uda_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    u_weak: torch.Tensor,
    u_strong: torch.Tensor,
    u_true: torch.Tensor,
    threshold: float,
    lambda_u: float,
    temperature: float,
    tsa: str,
    step: int,
    total_steps: int,
    **_,
) -> dict[str, torch.Tensor]:
    """UDA (Xie et al. 2020): TSA-masked supervised CE + confidence-masked KL consistency
    between the sharpened weak-view prediction and the strong view."""
    logits_x, logits_weak, logits_strong = _forward_three(model, x, u_weak, u_strong)
    eta = tsa_threshold(tsa, step, total_steps, logits_x.shape[1])
    loss_sup = tsa_cross_entropy(logits_x, y, eta)
    loss_unsup, mask = kl_consistency(logits_weak, logits_strong, temperature, threshold)
    return {
        "loss": loss_sup + lambda_u * loss_unsup,
        "loss_sup": loss_sup.detach(),
        "loss_unsup": loss_unsup.detach(),
        "mask_rate": mask.mean(),
        "pseudo_acc": _pseudo_accuracy(logits_weak, u_true, mask),
        "tsa_threshold": torch.tensor(eta),
    }


SEMISUP_STEPS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "supervised": supervised_step,
    "fixmatch": fixmatch_step,
    "uda": uda_step,
}
