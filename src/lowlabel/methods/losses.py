"""Losses as pure functions of tensors, each checked against its formula in tests/."""

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


def pseudo_labels(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels and the confidence mask ``max softmax >= threshold`` (FixMatch).

    Takes the weak view's logits, detached: no gradient flows through the targets.
    """
    probs = torch.softmax(logits.detach().float(), dim=1)
    confidence, labels = probs.max(dim=1)
    return labels, (confidence >= threshold).float()


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_i mask_i * CE(logits_i, targets_i)`` over all samples (masked ones count as 0)."""
    return (F.cross_entropy(logits, targets, reduction="none") * mask).mean()
