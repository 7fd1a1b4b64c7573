"""Pseudo-Label (Lee 2013): train on the model's own confident argmax labels of unlabeled images.

The unlabeled loss is the cross-entropy to the hard pseudo-label of the same (weak) view, weighted
by alpha(t): 0 at first, rising linearly to ``lambda_u`` (the paper's alpha_f) over the
ramp-up, so early, poor pseudo-labels do not steer training. The confidence ``threshold`` is
USB's addition (0 gives the paper's unthresholded loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.methods.semisup.base import SemisupMethod, unlabeled_report
from lowlabel.methods.semisup.losses import linear_rampup, masked_cross_entropy, pseudo_labels


def pseudo_label_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    u_weak: torch.Tensor,
    u_true: torch.Tensor,
    threshold: float,
    lambda_u: float,
    rampup_start: float,
    rampup_end: float,
    step: int,
    total_steps: int,
    **_,
) -> dict[str, torch.Tensor]:
    logits = model(torch.cat([x, u_weak]))
    logits_x, logits_u = logits[: len(x)], logits[len(x) :]
    probs = torch.softmax(logits_u.detach().float(), dim=1)
    targets, mask = pseudo_labels(probs, threshold)
    loss_sup = F.cross_entropy(logits_x, y)
    loss_unsup = masked_cross_entropy(logits_u, targets, mask)
    weight = lambda_u * linear_rampup(step, int(rampup_start * total_steps), int(rampup_end * total_steps))
    return {
        "loss": loss_sup + weight * loss_unsup,
        **unlabeled_report(loss_sup, loss_unsup, mask, probs, u_true),
        "unsup_weight": torch.tensor(weight),
    }


PSEUDO_LABEL = SemisupMethod(pseudo_label_step, uses_unlabeled=True, unlabeled_views=("weak",))
