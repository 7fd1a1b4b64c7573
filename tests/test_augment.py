import numpy as np
import pytest
import torch

from lowlabel.data.augment import contrastive_view, eval_view, sample_seed, strong_view, weak_view
from lowlabel.data.datasets import ViewsDataset


def views(channels: int, size: int = 28):
    mean, std = [0.5] * channels, [0.25] * channels
    return {
        "contrastive": contrastive_view(size, channels, mean, std),
        "weak": weak_view(size, mean, std),
        "strong": strong_view(size, channels, mean, std, num_ops=2, magnitude=10),
        "eval": eval_view(mean, std),
    }


@pytest.mark.parametrize("channels", [1, 3])
def test_views_keep_shape_and_dtype_and_are_seeded(channels):
    image = np.random.default_rng(0).integers(0, 256, (28, 28, channels), dtype=np.uint8)
    for name, view in views(channels).items():
        a, b = view(image, 123), view(image, 123)
        assert a.shape == (channels, 28, 28), name
        assert a.dtype == torch.float32, name
        assert torch.equal(a, b), f"{name} not deterministic under a seed"
        if name != "eval":
            assert any(not torch.equal(a, view(image, s)) for s in range(1, 5)), f"{name} ignores its seed"


def test_eval_view_is_normalisation_only():
    image = np.full((4, 4, 1), 255, dtype=np.uint8)
    out = eval_view([0.5], [0.25])(image, 0)
    assert torch.allclose(out, torch.full((1, 4, 4), 2.0))


def test_strong_view_cutout_fills_a_patch():
    image = np.zeros((28, 28, 1), dtype=np.uint8)
    mean, std = [0.0], [1.0]
    # Magnitude 0 keeps the RandAugment ops near identity; the cutout patch (fill 127) remains.
    strong = strong_view(28, 1, mean, std, num_ops=1, magnitude=0, cutout=0.5)
    filled = [((strong(image, s) - 127 / 255).abs() < 1e-6).sum().item() for s in range(10)]
    # The side is v * 28 with v ~ U[0, 0.5]: below 1/28 (about 1 draw in 14) no pixel is cut.
    assert sum(f > 0 for f in filled) >= 8
    assert all(f <= 14 * 14 for f in filled)


def test_sample_seed_is_order_independent_and_distinct():
    seeds = {sample_seed(0, e, i, v) for e in range(3) for i in range(50) for v in range(2)}
    assert len(seeds) == 300
    assert sample_seed(5, 1, 2, 0) == sample_seed(5, 1, 2, 0)


def test_views_dataset_same_sample_same_views_regardless_of_order():
    images = np.random.default_rng(2).integers(0, 256, (10, 28, 28, 1), dtype=np.uint8)
    v = views(1)["contrastive"]
    ds = ViewsDataset(images, np.arange(10), [v, v], targets=np.arange(10), seed=7)
    first = [ds[i] for i in range(10)]
    again = [ds[i] for i in reversed(range(10))][::-1]
    for x, y in zip(first, again):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert not torch.equal(first[0][0], first[0][1])  # two views differ
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], first[0][0])  # a new epoch, new augmentations


@pytest.mark.parametrize("channels", [1, 3])
def test_eval_view_batch_equals_the_per_image_view_bit_for_bit(channels):
    mean, std = [0.2, 0.5, 0.7][:channels], [0.3, 0.25, 0.2][:channels]
    view = eval_view(mean, std)
    images = np.random.default_rng(1).integers(0, 256, (9, 12, 10, channels), dtype=np.uint8)
    images[0, 0, :, 0] = [0, 255, 1, 254, 2, 3, 128, 127, 5, 6]  # both ends of the range
    batch = view.batch(images)
    assert batch.dtype == torch.float32 and batch.shape == (9, channels, 12, 10)
    assert torch.equal(batch, torch.stack([view(image, 0) for image in images]))


def test_view_batch_with_random_transforms_runs_the_pipeline_per_image():
    view = weak_view(8, [0.5], [0.25])
    assert view.pixel_table is None
    images = np.random.default_rng(2).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    assert torch.equal(view.batch(images), torch.stack([view(image, 0) for image in images]))
