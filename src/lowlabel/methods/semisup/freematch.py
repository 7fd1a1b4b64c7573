"""FreeMatch (Wang et al. 2023): FixMatch with self-adaptive class-wise thresholds (SAT) and a
self-adaptive fairness term (SAF).

Instead of one fixed tau, the bar follows the model: a running mean of the unlabeled batches'
confidence (starting at 1/C, so early pseudo-labels are used rather than discarded), scaled
per class by the running class probabilities (classes the model predicts less get a lower
bar). The running statistics are a module's buffers, reduced over workers, so every worker
masks alike and a resumed run continues them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.methods.semisup.base import (
    SemisupMethod,
    prediction_shares,
    unlabeled_report,
    update_running_mean_,
    weak_targets,
    weak_view_state,
)
from lowlabel.methods.semisup.losses import (
    fairness_loss,
    masked_cross_entropy,
    pseudo_labels,
    self_adaptive_thresholds,
)


class SelfAdaptiveThreshold(nn.Module):
    """Running confidence, class probabilities and pseudo-label histogram of the unlabeled data;
    ``forward(probs)`` updates them with this step's batch (all workers') and returns the
    per-class thresholds."""

    def __init__(self, num_classes: int, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("global_confidence", torch.tensor(1.0 / num_classes))
        self.register_buffer("class_probs", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("label_hist", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        probs = probs.float()
        confidence = probs.max(dim=1).values
        hist = prediction_shares(probs)
        for running, batch in ((self.global_confidence, confidence.mean()), (self.class_probs, probs.mean(0)), (self.label_hist, hist)):
            update_running_mean_(running, batch, self.momentum)
        return self_adaptive_thresholds(self.global_confidence, self.class_probs)


def freematch_state(num_classes: int, method_kwargs: dict[str, Any]) -> dict[str, nn.Module]:
    return {**weak_view_state(num_classes, method_kwargs), "thresholds": SelfAdaptiveThreshold(num_classes, method_kwargs["sat_momentum"])}


def freematch_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    u_weak: torch.Tensor,
    u_strong: torch.Tensor,
    u_true: torch.Tensor,
    lambda_u: float,
    lambda_f: float,
    thresholds: SelfAdaptiveThreshold,
    teacher: nn.Module | None = None,
    aligner: nn.Module | None = None,
    **_,
) -> dict[str, torch.Tensor]:
    """CE(strong view, pseudo-label of the weak view) where its confidence passes its class's
    self-adaptive threshold, plus ``lambda_f`` x the fairness term on those samples."""
    logits_x, weak_probs, logits_strong = weak_targets(model, x, u_weak, u_strong, teacher, aligner)
    loss_sup = F.cross_entropy(logits_x, y)
    class_thresholds = thresholds(weak_probs)
    targets, mask = pseudo_labels(weak_probs, class_thresholds)
    loss_unsup = masked_cross_entropy(logits_strong, targets, mask)
    loss_fair = fairness_loss(logits_strong, mask, thresholds.class_probs, thresholds.label_hist)
    return {
        "loss": loss_sup + lambda_u * loss_unsup + lambda_f * loss_fair,
        **unlabeled_report(loss_sup, loss_unsup, mask, weak_probs, u_true),
        "loss_fair": loss_fair.detach(),
        "threshold_mean": class_thresholds.mean(),
    }


FREEMATCH = SemisupMethod(freematch_step, uses_unlabeled=True, make_state=freematch_state)
