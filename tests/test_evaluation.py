"""Frozen-feature evaluation: the linear probe against cases whose answer is known."""

from __future__ import annotations

import torch

from lowlabel.evaluation import linear_probe_accuracy


def blobs(n_per_class: int, centers: torch.Tensor, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(centers)).repeat_interleave(n_per_class)
    return centers[labels] + noise * torch.randn(len(labels), centers.shape[1], generator=generator), labels


def test_linear_probe_separates_separable_classes_with_arbitrary_label_ids():
    centers = torch.eye(4, 6) * 5
    train_x, train_y = blobs(30, centers, 0.5, seed=0)
    test_x, test_y = blobs(20, centers, 0.5, seed=1)
    ids = torch.tensor([7, 3, 11, 0])  # original class ids need not be 0..C-1
    assert linear_probe_accuracy(train_x, ids[train_y], test_x, ids[test_y]) == 1.0


def test_linear_probe_is_at_chance_on_unrelated_labels_and_deterministic():
    generator = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(400, 8, generator=generator), torch.randn(400, 8, generator=generator)
    train_y, test_y = torch.randint(0, 2, (400,), generator=generator), torch.randint(0, 2, (400,), generator=generator)
    accuracy = linear_probe_accuracy(train_x, train_y, test_x, test_y)
    assert 0.4 < accuracy < 0.6
    assert accuracy == linear_probe_accuracy(train_x, train_y, test_x, test_y)


def test_linear_probe_beats_nearest_mean_when_one_dimension_carries_the_signal():
    # Class signal in one low-variance dimension, large nuisance variance elsewhere: a fitted
    # linear classifier finds it (what a probe measures beyond kNN-style distances).
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (600,), generator=generator)
    x = torch.randn(600, 10, generator=generator) * 10
    x[:, 0] = (y * 2 - 1) * 0.5 + 0.1 * torch.randn(600, generator=generator)
    assert linear_probe_accuracy(x[:300], y[:300], x[300:], y[300:]) > 0.98
