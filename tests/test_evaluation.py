"""Frozen-feature evaluation: the linear probe against cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
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


@pytest.mark.parametrize("channels_last", [True, False])
def test_eval_forwards_in_cache_sized_batches_change_no_value(channels_last, one_torch_thread):
    """Evaluation and the EMA teacher run eval-mode forwards in batches of 64 on CPU (2.3x the
    throughput of 512 for Conv-4): each sample's output must be bit-identical to one big batch."""
    from lowlabel.data.augment import eval_view
    from lowlabel.evaluation import extract_features
    from lowlabel.models.batching import CPU_EVAL_BATCH, forward_in_batches
    from lowlabel.models.encoders import build_encoder, feature_dim
    from lowlabel.models.heads import Classifier

    torch.manual_seed(0)
    encoder = build_encoder("conv4", 1, 16)
    model = Classifier(encoder, feature_dim(encoder, 1, 28), 5)
    model.train()
    model(torch.randn(32, 1, 28, 28) * 2 + 0.5)  # running statistics that are not the init's
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    x = torch.randn(3 * CPU_EVAL_BATCH - 5, 1, 28, 28).contiguous(memory_format=memory_format)
    with torch.no_grad():
        assert torch.equal(forward_in_batches(model, x), model(x))
    images = np.random.default_rng(0).integers(0, 256, (150, 28, 28, 1), dtype=np.uint8)
    view = eval_view([0.3], [0.35])
    small = extract_features(encoder, images, np.arange(150), view, channels_last=channels_last)
    assert torch.equal(small, extract_features(encoder, images, np.arange(150), view, batch_size=150, channels_last=channels_last))
