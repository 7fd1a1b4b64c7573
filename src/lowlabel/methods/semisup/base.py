"""What every semi-supervised method shares: the step signature (:class:`SemisupMethod`), the
weak-view target (labelled by the student or by a teacher, optionally aligned), the running
statistics helpers (distribution alignment, running means reduced over workers) and the stats
every method with unlabeled data logs.

A method is a :class:`SemisupMethod`, one module each in this package: a step mapping (model,
labeled batch, unlabeled views) to a dict of losses/stats, and the running statistics it keeps
(modules the loop checkpoints). Pure losses (pseudo-labelling with a confidence threshold,
masked cross-entropy, sharpening, distribution alignment) are in ``losses``, batch mixing in
``mixing``. The EMA teacher is timm's ``ModelEmaV3``, held by the training loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowlabel.distributed import all_reduce_mean
from lowlabel.methods.semisup.losses import (
    align_distribution,
    debias_probabilities,
    logit_adjusted_cross_entropy,
    masked_cross_entropy,
)
from lowlabel.models.batching import forward_in_batches


@torch.no_grad()
def update_running_mean_(running: torch.Tensor, batch_value: torch.Tensor, momentum: float) -> None:
    """``running <- momentum * running + (1 - momentum) * mean over workers of batch_value``.

    Workers hold equal batches, so the mean of their batch means is the union's mean: every
    worker keeps the same running statistic."""
    running.mul_(momentum).add_(all_reduce_mean(batch_value), alpha=1 - momentum)


class DistributionAlignment(nn.Module):
    """The running mean of the model's predictions on unlabeled data, and the alignment of
    each batch's weak-view probabilities by it (towards a uniform prior: the base classes are
    balanced). The mean is taken over every worker's batch, so all workers align alike; it is
    a buffer, so it rides in the checkpoint and a resumed run aligns as an uninterrupted one.
    """

    def __init__(self, num_classes: int, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("model_mean", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        update_running_mean_(self.model_mean, probs.float().mean(dim=0), self.momentum)
        return align_distribution(probs, self.model_mean)


class PseudoLabelDebiasing(nn.Module):
    """DebiasPL (Wang et al. 2022): the running mean of the model's weak-view predictions
    (``prior``, all-reduced over workers, checkpointed as a buffer) debiases each batch's
    pseudo-labels by ``prior^-tau`` and adjusts the logits of their loss by ``tau log prior``,
    so a class the model drifts towards is both labelled less and learned against.
    """

    def __init__(self, num_classes: int, tau: float, momentum: float) -> None:
        super().__init__()
        self.tau, self.momentum = tau, momentum
        self.register_buffer("prior", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        update_running_mean_(self.prior, probs.float().mean(dim=0), self.momentum)
        return debias_probabilities(probs, self.prior, self.tau)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return logit_adjusted_cross_entropy(logits, targets, mask, self.prior, self.tau)


def pseudo_label_loss(
    logits_strong: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, debiaser: PseudoLabelDebiasing | None = None
) -> torch.Tensor:
    """The strong view's masked cross-entropy against the pseudo-labels (logit-adjusted when debiasing)."""
    if debiaser is None:
        return masked_cross_entropy(logits_strong, targets, mask)
    return debiaser.cross_entropy(logits_strong, targets, mask)


def weak_targets(
    model: nn.Module,
    x: torch.Tensor,
    u_weak: torch.Tensor,
    u_strong: torch.Tensor,
    teacher: nn.Module | None = None,
    aligner: DistributionAlignment | None = None,
    debiaser: PseudoLabelDebiasing | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labeled logits, the weak view's target probabilities, strong-view logits).

    The student sees the labeled batch and both unlabeled views in one forward, as the papers
    do, so BN's batch and running statistics cover them all. The weak view is labelled by the
    student itself, or by a teacher (the EMA model, in eval mode, without gradient): slower-
    moving targets, less confirmation bias. The aligner, then the debiaser, if any, rescale the
    probabilities; the targets never carry gradient.
    """
    logits = model(torch.cat([x, u_weak, u_strong]))
    logits_x, logits_weak, logits_strong = logits[: len(x)], *logits[len(x) :].chunk(2)
    if teacher is not None:
        with torch.no_grad():
            logits_weak = forward_in_batches(teacher, u_weak)  # eval mode: same values, cache-sized batches on CPU
    probs = torch.softmax(logits_weak.detach().float(), dim=1)
    if aligner is not None:
        probs = aligner(probs)
    if debiaser is not None:
        probs = debiaser(probs)
    return logits_x, probs, logits_strong


def _pseudo_accuracy(weak_probs: torch.Tensor, u_true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Of the unlabeled samples that pass the mask, how many have the right argmax (monitor only)."""
    known = (u_true >= 0).float()
    correct = (weak_probs.argmax(1) == u_true).float() * known
    return (correct * mask).sum() / (mask * known).sum().clamp(min=1)


def prediction_shares(probs: torch.Tensor) -> torch.Tensor:
    """Each class's share of the batch's argmax labels, shape (C,)."""
    counts = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).float()
    return counts / counts.sum().clamp(min=1)


def prediction_balance(weak_probs: torch.Tensor) -> torch.Tensor:
    """``C * (share of the least-predicted class)`` among the weak view's argmax labels (monitor
    only): 1 when every class is predicted equally often (the base classes are balanced), 0 when
    a class is never predicted. Class collapse, the confirmation bias of training on one's own
    pseudo-labels, shows here without any label, where overall accuracy hides which class went."""
    shares = prediction_shares(weak_probs)
    return shares.numel() * shares.min()


def unlabeled_report(
    loss_sup: torch.Tensor, loss_unsup: torch.Tensor, mask: torch.Tensor, weak_probs: torch.Tensor, u_true: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The stats every method with unlabeled data logs (beside its ``loss``)."""
    return {
        "loss_sup": loss_sup.detach(),
        "loss_unsup": loss_unsup.detach(),
        "mask_rate": mask.mean(),
        "pseudo_acc": _pseudo_accuracy(weak_probs, u_true, mask),
        "pseudo_balance": prediction_balance(weak_probs),
    }


def no_state(num_classes: int, method_kwargs: dict[str, Any]) -> dict[str, nn.Module]:
    return {}


def weak_view_state(num_classes: int, method_kwargs: dict[str, Any]) -> dict[str, nn.Module]:
    """The distribution aligner and the DebiasPL debiaser, when the method's params turn them on."""
    state: dict[str, nn.Module] = {}
    if method_kwargs.get("dist_align"):
        state["aligner"] = DistributionAlignment(num_classes, method_kwargs["dist_align_momentum"])
    if method_kwargs.get("debias", 0.0) > 0:
        state["debiaser"] = PseudoLabelDebiasing(num_classes, method_kwargs["debias"], method_kwargs["debias_momentum"])
    return state


@dataclass(frozen=True)
class SemisupMethod:
    """What the training loop needs of a method.

    ``make_state(num_classes, method_kwargs)`` builds the method's running statistics (e.g.
    the aligner): the loop moves them to the device, passes each to ``step`` by its name and
    saves their state dicts in every checkpoint, so a resumed run continues them.
    """

    step: Callable[..., dict[str, torch.Tensor]]
    uses_unlabeled: bool
    make_state: Callable[[int, dict[str, Any]], dict[str, nn.Module]] = no_state
    # The recipes of the unlabeled views the loop makes, passed as u_weak and u_strong (in this
    # order; a method with one view gets no u_strong): FixMatch's weak + strong by default.
    unlabeled_views: tuple[str, ...] = ("weak", "strong")
    # The step also gets u_index (the images' positions in the unlabeled split) and make_state
    # gets num_unlabeled in its kwargs: for per-image records (FlexMatch).
    uses_index: bool = False
