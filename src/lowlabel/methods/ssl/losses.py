"""The self-supervised losses as pure functions of tensors, each checked against its formula in tests/."""

from __future__ import annotations

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


def dino_loss(
    student_logits: list[torch.Tensor],
    teacher_logits: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """DINO's loss (Caron et al. 2021, eq. 3 and Algorithm 1): the cross-entropy
    ``-sum_k P_t(x_v)_k log P_s(x_v')_k`` averaged over the batch and over every pair of a global
    view v (``teacher_logits[v]``, the teacher's outputs on the global views) and a view v' != v
    (``student_logits[v']``, the student's on all views, global first).

    ``P_t = softmax((t - center) / teacher_temp)`` is the centred, sharpened teacher (a fixed
    target: no gradient), ``P_s = softmax(s / student_temp)``.
    """
    targets = [torch.softmax((_at_least_fp32(t.detach()) - center) / teacher_temp, dim=1) for t in teacher_logits]
    log_probs = [F.log_softmax(_at_least_fp32(s) / student_temp, dim=1) for s in student_logits]
    terms = [
        -(target * log_probs[v]).sum(dim=1).mean()
        for g, target in enumerate(targets)
        for v in range(len(log_probs))
        if v != g
    ]
    return torch.stack(terms).mean()
