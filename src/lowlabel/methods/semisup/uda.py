"""UDA (Xie et al. 2020): training-signal-annealed supervised cross-entropy plus a
confidence-masked KL consistency between the sharpened weak view and the strong view."""

from __future__ import annotations

import torch
from torch import nn

from lowlabel.methods.semisup.base import (
    DistributionAlignment,
    SemisupMethod,
    unlabeled_report,
    weak_targets,
    weak_view_state,
)
from lowlabel.methods.semisup.losses import kl_consistency, tsa_cross_entropy, tsa_threshold


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
    teacher: nn.Module | None = None,
    aligner: DistributionAlignment | None = None,
    **_,
) -> dict[str, torch.Tensor]:
    """UDA (Xie et al. 2020): TSA-masked supervised CE + confidence-masked KL consistency
    between the sharpened weak-view prediction and the strong view."""
    logits_x, weak_probs, logits_strong = weak_targets(model, x, u_weak, u_strong, teacher, aligner)
    eta = tsa_threshold(tsa, step, total_steps, logits_x.shape[1])
    loss_sup = tsa_cross_entropy(logits_x, y, eta)
    loss_unsup, mask = kl_consistency(weak_probs, logits_strong, temperature, threshold)
    return {
        "loss": loss_sup + lambda_u * loss_unsup,
        **unlabeled_report(loss_sup, loss_unsup, mask, weak_probs, u_true),
        "tsa_threshold": torch.tensor(eta),
    }


UDA = SemisupMethod(uda_step, uses_unlabeled=True, make_state=weak_view_state)
