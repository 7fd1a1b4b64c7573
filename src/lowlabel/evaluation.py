"""Frozen-encoder evaluation on held-out images: feature extraction, weighted kNN and the linear probe."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.data.augment import View
from lowlabel.data.prepared import PreparedData
from lowlabel.models.batching import eval_batch_size


@torch.inference_mode()
def extract_features(
    encoder: nn.Module,
    images: np.ndarray,
    indices: Sequence[int],
    view: View,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """Encoder outputs (eval mode, no augmentation) for ``images[indices]``, as float32 on CPU."""
    was_training = encoder.training
    encoder.eval()
    batch_size = batch_size or eval_batch_size(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    indices = np.asarray(indices)
    for start in range(0, len(indices), batch_size):
        batch = view.batch(images[indices[start : start + batch_size]]).to(device)
        out.append(encoder(batch.contiguous(memory_format=memory_format)).float().cpu())
    encoder.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def extract_features_distributed(
    encoder: nn.Module,
    images: np.ndarray,
    indices: Sequence[int],
    view: View,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """:func:`extract_features` shared by every worker of a distributed job (a collective: all
    call it): each embeds a contiguous share of ``indices`` with rank 0's copy of ``encoder``,
    and every worker returns all of them in order, the same values rank 0 alone would compute.
    Rank 0's copy because replicas' BatchNorm statistics drift apart between DDP's broadcasts."""
    from lowlabel.distributed import gather_shards, rank, replica_of_main, world_size

    indices = np.asarray(indices)
    world = world_size()
    if world == 1 or len(indices) < world:
        return extract_features(encoder, images, indices, view, device=device, channels_last=channels_last)
    encoder = replica_of_main(encoder)
    shares = np.array_split(indices, world)
    local = extract_features(encoder, images, shares[rank()], view, device=device, channels_last=channels_last)
    return gather_shards(local.to(device), [len(share) for share in shares]).cpu()


def knn_accuracy(
    bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor, k: int = 20, temperature: float = 0.07
) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018, as solo-learn monitors SSL): accuracy in [0,1].

    Each of the k nearest bank samples votes for its label with weight exp(sim / T).
    """
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(query), 1024):
        sims, idx = (query[start : start + 1024] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(idx), num_classes).scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
        correct += (votes.argmax(1) == query_labels[start : start + 1024]).sum().item()
    return correct / max(1, len(query))


def knn_split(data: PreparedData, bank_size: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The kNN bank (a fixed subset of base training images; None: all) and the base test images."""
    rng = np.random.default_rng(seed)
    bank = np.sort(rng.permutation(np.asarray(data.split.pretrain))[:bank_size])
    return bank, np.asarray(data.split.test_base)


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> float:
    """Linear-probe accuracy: multinomial logistic regression on frozen features.

    Features are standardised with the training set's statistics; the classifier is fitted
    full-batch with L-BFGS (deterministic, no learning rate to tune) and an L2 penalty
    ``weight_decay * ||W||^2``. Labels may be any integers (mapped to 0..C-1).
    """
    classes, train_y = torch.unique(train_labels, return_inverse=True)
    x = train_features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], len(classes), dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, train_y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predicted = classes[(((test_features.double() - mean) / std) @ weight + bias).argmax(1)]
    return float((predicted == test_labels).double().mean())
