"""FlexMatch (Zhang et al. 2021): FixMatch with Curriculum Pseudo Labelling — each class's bar
follows how far the model has learned it.

The learning effect of class c is sigma(c), the number of unlabeled images whose last confident
(max p >= tau) pseudo-label was c. Normalised, beta(c) = sigma(c) / max(max_k sigma(k), N - sum_k
sigma(k)) with the warm-up (the images never yet confident count as one more "class", so early
bars stay low and rise as the model commits), and the threshold is tau x M(beta(c)) with the
convex mapping M(x) = x / (2 - x). The per-image record is a buffer over the whole unlabeled
split, updated with every worker's batch (indices and labels gathered), so every worker holds
the same record and a resumed run continues it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.distributed import gather_no_grad
from lowlabel.methods.semisup.base import (
    PseudoLabelDebiasing,
    SemisupMethod,
    pseudo_label_loss,
    unlabeled_report,
    weak_targets,
    weak_view_state,
)
from lowlabel.methods.semisup.losses import pseudo_labels


def flexmatch_thresholds(selected: torch.Tensor, num_classes: int, tau: float, warmup: bool = True) -> torch.Tensor:
    """Per-class thresholds ``tau * M(beta(c))`` from the per-image record ``selected`` (-1: never confident)."""
    sigma = torch.bincount(selected[selected >= 0], minlength=num_classes).float()
    unused = (selected < 0).sum().float()
    denominator = torch.maximum(sigma.max(), unused) if warmup else sigma.max()
    beta = sigma / denominator.clamp(min=1)
    return tau * beta / (2 - beta)


class LearningEffect(nn.Module):
    """The last confident pseudo-label of every unlabeled image (-1 when it has none yet)."""

    def __init__(self, num_unlabeled: int, num_classes: int, threshold: float, warmup: bool) -> None:
        super().__init__()
        self.num_classes, self.threshold, self.warmup = num_classes, threshold, warmup
        self.register_buffer("selected", torch.full((num_unlabeled,), -1, dtype=torch.long))

    def thresholds(self) -> torch.Tensor:
        return flexmatch_thresholds(self.selected, self.num_classes, self.threshold, self.warmup)

    @torch.no_grad()
    def record(self, index: torch.Tensor, probs: torch.Tensor) -> None:
        """Every worker's images whose confidence passes the fixed tau get their argmax recorded."""
        confidence, labels = probs.float().max(dim=1)
        index, labels, confident = (gather_no_grad(t) for t in (index, labels, (confidence >= self.threshold).long()))
        keep = confident.bool()
        self.selected[index[keep]] = labels[keep]


def flexmatch_state(num_classes: int, method_kwargs: dict[str, Any]) -> dict[str, nn.Module]:
    effect = LearningEffect(method_kwargs["num_unlabeled"], num_classes, method_kwargs["threshold"], method_kwargs["threshold_warmup"])
    return {**weak_view_state(num_classes, method_kwargs), "learning_effect": effect}


def flexmatch_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    u_weak: torch.Tensor,
    u_strong: torch.Tensor,
    u_true: torch.Tensor,
    u_index: torch.Tensor,
    lambda_u: float,
    learning_effect: LearningEffect,
    teacher: nn.Module | None = None,
    aligner: nn.Module | None = None,
    debiaser: PseudoLabelDebiasing | None = None,
    **_,
) -> dict[str, torch.Tensor]:
    """CE(strong view, pseudo-label of the weak view) where its confidence passes its class's
    flexible threshold (from the record before this batch); then this batch is recorded."""
    logits_x, weak_probs, logits_strong = weak_targets(model, x, u_weak, u_strong, teacher, aligner, debiaser)
    class_thresholds = learning_effect.thresholds()
    targets, mask = pseudo_labels(weak_probs, class_thresholds)
    learning_effect.record(u_index, weak_probs)
    loss_sup = F.cross_entropy(logits_x, y)
    loss_unsup = pseudo_label_loss(logits_strong, targets, mask, debiaser)
    return {
        "loss": loss_sup + lambda_u * loss_unsup,
        **unlabeled_report(loss_sup, loss_unsup, mask, weak_probs, u_true),
        "threshold_mean": class_thresholds.mean(),
    }


FLEXMATCH = SemisupMethod(flexmatch_step, uses_unlabeled=True, make_state=flexmatch_state, uses_index=True)
