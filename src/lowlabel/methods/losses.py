"""Losses as pure functions of tensors, each checked against its formula in tests/."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lowlabel.distributed import gather_distributed, rank


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool = False) -> torch.Tensor:
    """NT-Xent (SimCLR, Chen et al. 2020) over the 2N views of N images.

    ``z1[i]`` and ``z2[i]`` are the projections of two views of image i. Each of the 2N views
    is an anchor whose positive is its partner and whose negatives are the other 2N-2 views:
    ``-log exp(s(a,p)/t) / sum_{k != a} exp(s(a,k)/t)`` with cosine similarity s, averaged
    over anchors. With ``gather`` the candidates are every worker's views (with gradients),
    so a 2-worker run on B1, B2 computes the 1-worker loss on B1 u B2.
    """
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    n = z1.shape[0]
    if gather:
        z1_all, z2_all, offset = gather_distributed(z1), gather_distributed(z2), rank() * n
    else:
        z1_all, z2_all, offset = z1, z2, 0
    targets = torch.arange(n, device=z1.device) + offset
    self_mask = F.one_hot(targets, z1_all.shape[0]).bool()
    # Anchor view 1: positives among z2_all, negatives z2_all + z1_all minus itself.
    logits_1 = torch.cat([z1 @ z2_all.T, (z1 @ z1_all.T).masked_fill(self_mask, float("-inf"))], dim=1) / temperature
    logits_2 = torch.cat([z2 @ z1_all.T, (z2 @ z2_all.T).masked_fill(self_mask, float("-inf"))], dim=1) / temperature
    return (F.cross_entropy(logits_1, targets) + F.cross_entropy(logits_2, targets)) / 2


def infonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE against a memory queue (MoCo, He et al. 2020).

    ``-log exp(q.k+/t) / (exp(q.k+/t) + sum_j exp(q.queue_j/t))`` averaged over queries;
    q, k (N, D) and the queue (D, K) are expected L2-normalised; k carries no gradient.
    """
    positives = (q * k).sum(dim=1, keepdim=True)
    negatives = q @ queue
    logits = torch.cat([positives, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


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


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, eq. 2): ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)``,
    averaged over the batch; ``z`` is the target network's projection and carries no gradient."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


def _at_least_fp32(z: torch.Tensor) -> torch.Tensor:
    # Batch statistics in bf16/fp16 lose the small correlations these losses are made of.
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    # Population std (divide by N), as Barlow Twins' BatchNorm1d(affine=False) normalises.
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float, gather: bool = False) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, eq. 1): ``sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2``.

    ``C = z1n.T @ z2n / N`` is the cross-correlation of the two views' embeddings, each
    standardised over the batch (biased variance + 1e-5, as the authors' BatchNorm1d). With ``gather`` the batch is every worker's (gathered with
    gradients, so each worker computes the global loss): batch statistics must be the global
    batch's, and DDP's gradient average then equals the 1-worker gradient on the union.
    """
    if gather:
        z1, z2 = gather_distributed(z1), gather_distributed(z2)
    n = z1.shape[0]
    c = _standardise(_at_least_fp32(z1)).T @ _standardise(_at_least_fp32(z2)) / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on_diag + lambda_offdiag * off_diag


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    gather: bool = False,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg (Bardes et al. 2022): ``lambda s(z1, z2) + mu [v(z1) + v(z2)] + nu [c(z1) + c(z2)]``.

    s: squared difference of the views, averaged over batch and dimensions (the paper's
    Algorithm 1 and code, ``F.mse_loss``: the 25/25/1 weights are tuned for it); v: ``mean_j max(0, 1 - sqrt(Var z_j + eps))``
    (unbiased variance, per dimension); c: the squared off-diagonal entries of the covariance
    matrix (unbiased), summed and divided by the dimension d. With ``gather`` variance and
    covariance are the global batch's (gathered with gradients), the invariance term too.
    Returns (loss, its three terms).
    """
    if gather:
        z1, z2 = gather_distributed(z1), gather_distributed(z2)
    z1, z2 = _at_least_fp32(z1), _at_least_fp32(z2)
    n, d = z1.shape
    invariance = F.mse_loss(z1, z2)

    def variance(z: torch.Tensor) -> torch.Tensor:
        return F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()

    def covariance(z: torch.Tensor) -> torch.Tensor:
        centred = z - z.mean(dim=0)
        cov = centred.T @ centred / (n - 1)
        return (cov - torch.diag(torch.diagonal(cov))).pow(2).sum() / d

    var_term, cov_term = variance(z1) + variance(z2), covariance(z1) + covariance(z2)
    loss = sim_weight * invariance + var_weight * var_term + cov_weight * cov_term
    return loss, {"invariance": invariance.detach(), "variance": var_term.detach(), "covariance": cov_term.detach()}


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
