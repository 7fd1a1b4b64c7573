"""The semi-supervised losses and schedules as pure functions of tensors, each checked against its formula in tests/."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pseudo_labels(probs: torch.Tensor, threshold: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels and the confidence mask ``max p >= threshold`` (FixMatch).

    Takes the weak view's class probabilities (a softmax, possibly aligned or a teacher's);
    detached: no gradient flows through the targets. ``threshold`` is one number, or one per
    class (a tensor of shape (C,)): then each sample is held to its pseudo-label's threshold.
    """
    confidence, labels = probs.detach().float().max(dim=1)
    if isinstance(threshold, torch.Tensor) and threshold.ndim == 1:
        threshold = threshold.to(confidence)[labels]
    return labels, (confidence >= threshold).float()


def self_adaptive_thresholds(global_confidence: torch.Tensor, class_probs: torch.Tensor) -> torch.Tensor:
    """FreeMatch's self-adaptive thresholds (Wang et al. 2023): ``tau(c) = tau_g * p(c) / max_k p(k)``.

    ``global_confidence`` (tau_g) is a running mean of the unlabeled batches' max probability and
    ``class_probs`` a running mean of their class probabilities: the threshold follows the
    model's confidence, and classes it predicts less (harder ones) get a lower bar.
    """
    return global_confidence * class_probs / class_probs.max()


def fairness_loss(strong_logits: torch.Tensor, mask: torch.Tensor, class_probs: torch.Tensor, label_hist: torch.Tensor) -> torch.Tensor:
    """FreeMatch's self-adaptive fairness term ``-H(SumNorm(p/h), SumNorm(p_b/h_b))``, as published.

    ``p``/``h``: running means of the class probabilities and of the pseudo-label histogram;
    ``p_b``/``h_b``: the mean probability and the argmax histogram of the strong view over the
    masked samples of this batch; ``H(a, b) = -sum a log b``. Classes absent from a histogram
    get scale 0 (not inf). No masked sample: 0.
    """
    selected = mask.bool()
    if not selected.any():
        return strong_logits.sum() * 0.0
    probs = torch.softmax(strong_logits[selected].float(), dim=1)
    batch_hist = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).float()
    batch_hist = batch_hist / batch_hist.sum()

    def normalised(p: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        scaled = p * torch.where(hist > 0, 1 / hist.clamp_min(1e-12), torch.zeros_like(hist))
        return scaled / scaled.sum()

    target = normalised(class_probs.float(), label_hist.float()).detach()
    batch = normalised(probs.mean(dim=0), batch_hist)
    return (target * torch.log(batch + 1e-12)).sum()


def align_distribution(probs: torch.Tensor, model_mean: torch.Tensor, target_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Distribution alignment (ReMixMatch, Berthelot et al. 2020): ``Normalize(p * target / model)``.

    ``model_mean`` is a running mean of the model's predictions on unlabeled data and
    ``target_mean`` the class prior (uniform when None). Classes the model over-predicts are
    scaled down in every pseudo-label, which counters the drift of a model trained on a few
    labels towards a few classes.
    """
    target = torch.full_like(model_mean, 1.0 / model_mean.numel()) if target_mean is None else target_mean
    aligned = probs.detach().float() * (target / model_mean.clamp_min(1e-12))
    return aligned / aligned.sum(dim=1, keepdim=True)


def debias_probabilities(probs: torch.Tensor, prior: torch.Tensor, tau: float) -> torch.Tensor:
    """DebiasPL's pseudo-label debiasing (Wang et al. 2022): ``softmax(log p - tau log prior)``,
    i.e. ``Normalize(p * prior^-tau)``.

    ``prior`` is a running mean of the model's predictions on unlabeled data: classes it
    over-predicts are scaled down. At ``tau`` 1 with a uniform class prior this is ReMixMatch's
    distribution alignment; ``tau`` 0 leaves ``p`` as it is.
    """
    debiased = probs.detach().float() * prior.clamp_min(1e-12).pow(-tau)
    return debiased / debiased.sum(dim=1, keepdim=True)


def logit_adjusted_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, prior: torch.Tensor, tau: float
) -> torch.Tensor:
    """DebiasPL's adaptive marginal loss: ``masked CE(logits + tau log prior, targets)``.

    Logit adjustment (Menon et al. 2021) with the model's own running prediction mean as the
    prior: a pseudo-label of a class the model over-predicts is met with less raw logit, one of
    a rare class needs more, so the raw logits (what the model predicts with) move away from
    the classes it drifts towards. The prior carries no gradient.
    """
    return masked_cross_entropy(logits + tau * torch.log(prior.detach().clamp_min(1e-12)).to(logits.dtype), targets, mask)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_i mask_i * CE(logits_i, targets_i)`` over all samples (masked ones count as 0)."""
    return (F.cross_entropy(logits, targets, reduction="none") * mask).mean()


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``p_i^(1/T) / sum_j p_j^(1/T)`` (UDA's target sharpening; T < 1 sharpens)."""
    logits = torch.log(probs.clamp_min(1e-12)) / temperature
    return torch.softmax(logits, dim=1)


def tsa_threshold(schedule: str, step: int, total_steps: int, num_classes: int) -> float:
    """Training-signal annealing (Xie et al. 2020): eta_t = alpha_t (1 - 1/K) + 1/K.

    alpha_t is t/T ("linear"), 1 - exp(-5 t/T) ("log"), exp(5 (t/T - 1)) ("exp"); "none" is 1.
    """
    progress = min(1.0, step / max(1, total_steps))
    alpha = {
        "none": 1.0,
        "linear": progress,
        "log": 1 - math.exp(-5 * progress),
        "exp": math.exp(5 * (progress - 1)),
    }[schedule]
    return alpha * (1 - 1 / num_classes) + 1 / num_classes


def tsa_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, threshold: float) -> torch.Tensor:
    """Cross-entropy over the labeled samples whose correct-class probability is still below
    ``threshold``; confident ones are masked out (so the few labels are not over-fitted)."""
    loss = F.cross_entropy(logits, targets, reduction="none")
    correct_prob = torch.softmax(logits.detach().float(), dim=1).gather(1, targets[:, None]).squeeze(1)
    mask = (correct_prob < threshold).float()
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def kl_consistency(weak_probs: torch.Tensor, strong_logits: torch.Tensor, temperature: float, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """UDA's consistency loss: KL(sharpen(p(weak)) || p(strong)) where max p(weak) >= threshold.

    ``weak_probs`` are the weak view's class probabilities (a fixed target: detached).
    Returns (loss averaged over all unlabeled samples, mask).
    """
    weak = weak_probs.detach().float()
    mask = (weak.max(dim=1).values >= threshold).float()
    target = sharpen(weak, temperature)
    kl = (target * (torch.log(target.clamp_min(1e-12)) - F.log_softmax(strong_logits.float(), dim=1))).sum(dim=1)
    return (kl * mask).mean(), mask


def linear_rampup(step: int, start: int, end: int) -> float:
    """0 before ``start``, rising linearly to 1 at ``end``, 1 after (Pseudo-Label's alpha(t)/alpha_f)."""
    if step >= end:
        return 1.0
    return max(0.0, (step - start) / max(1, end - start))


def sigmoid_rampup(step: int, length: int) -> float:
    """``exp(-5 (1 - t)^2)`` with t = step / length, 1 from ``length`` on (Mean Teacher's ramp-up,
    after Laine & Aila 2017); ``length`` 0: no ramp-up."""
    if length <= 0 or step >= length:
        return 1.0
    t = max(0.0, step / length)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def softmax_mse(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean Teacher's consistency cost: ``mean_i mean_c (softmax(s_i)_c - t_ic)^2``; the teacher's
    probabilities are a fixed target (detached)."""
    return (torch.softmax(student_logits.float(), dim=1) - teacher_probs.detach().float()).pow(2).mean()
