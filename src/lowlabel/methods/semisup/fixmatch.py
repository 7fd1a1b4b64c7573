"""FixMatch (Sohn et al. 2020): cross-entropy of the strong view against the weak view's
pseudo-label, where the weak view is confident."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.methods.semisup.base import (
    DistributionAlignment,
    PseudoLabelDebiasing,
    SemisupMethod,
    pseudo_label_loss,
    unlabeled_report,
    weak_targets,
    weak_view_state,
)
from lowlabel.methods.semisup.losses import pseudo_labels


def fixmatch_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    u_weak: torch.Tensor,
    u_strong: torch.Tensor,
    u_true: torch.Tensor,
    threshold: float,
    lambda_u: float,
    teacher: nn.Module | None = None,
    aligner: DistributionAlignment | None = None,
    debiaser: PseudoLabelDebiasing | None = None,
    **_,
) -> dict[str, torch.Tensor]:
    """FixMatch (Sohn et al. 2020): CE(strong view, pseudo-label of weak view) where confident.

    ``u_true`` (the unlabeled samples' real labels, or -1) is used for monitoring only:
    it never enters a loss.
    """
    logits_x, weak_probs, logits_strong = weak_targets(model, x, u_weak, u_strong, teacher, aligner, debiaser)
    loss_sup = F.cross_entropy(logits_x, y)
    targets, mask = pseudo_labels(weak_probs, threshold)
    loss_unsup = pseudo_label_loss(logits_strong, targets, mask, debiaser)
    return {"loss": loss_sup + lambda_u * loss_unsup, **unlabeled_report(loss_sup, loss_unsup, mask, weak_probs, u_true)}


FIXMATCH = SemisupMethod(fixmatch_step, uses_unlabeled=True, make_state=weak_view_state)
