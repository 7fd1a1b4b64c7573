"""Mean Teacher (Tarvainen & Valpola 2017): the student's prediction on one noisy view is pulled
towards the prediction of its EMA (the teacher, the loop's ``ema`` model) on another view.

Consistency is the mean squared difference of the two softmax outputs, weighted by
``lambda_u`` x the paper's sigmoid ramp-up ``exp(-5 (1 - t)^2)``. The gradient reaches the
student only: the teacher runs without gradient and moves by EMA alone. Both views are the weak
recipe (random translation and flip: the paper's input noise), as in USB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.methods.semisup.base import SemisupMethod, unlabeled_report
from lowlabel.methods.semisup.losses import sigmoid_rampup, softmax_mse


def mean_teacher_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    u_weak: torch.Tensor,
    u_strong: torch.Tensor,
    u_true: torch.Tensor,
    lambda_u: float,
    rampup_fraction: float,
    step: int,
    total_steps: int,
    teacher: nn.Module | None,
    **_,
) -> dict[str, torch.Tensor]:
    """``u_weak`` goes to the teacher, ``u_strong`` (here a second weak view) to the student."""
    if teacher is None:
        raise ValueError("mean teacher needs the EMA teacher (semisup.meanteacher.teacher: ema)")
    logits = model(torch.cat([x, u_strong]))
    logits_x, logits_u = logits[: len(x)], logits[len(x) :]
    with torch.no_grad():
        teacher_probs = torch.softmax(teacher(u_weak).float(), dim=1)
    loss_sup = F.cross_entropy(logits_x, y)
    loss_unsup = softmax_mse(logits_u, teacher_probs)
    weight = lambda_u * sigmoid_rampup(step, int(rampup_fraction * total_steps))
    every = torch.ones(len(u_weak), device=u_weak.device)
    return {
        "loss": loss_sup + weight * loss_unsup,
        **unlabeled_report(loss_sup, loss_unsup, every, teacher_probs, u_true),
        "unsup_weight": torch.tensor(weight),
    }


MEAN_TEACHER = SemisupMethod(mean_teacher_step, uses_unlabeled=True, unlabeled_views=("weak", "weak"))
