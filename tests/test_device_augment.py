"""Batched augmentation on the training device (lowlabel.data.device_augment) against the CPU recipes.

Per-sample randomness and seeding; shapes and dtypes at 1 and 3 channels, 28/32/96 px; the
contrastive and weak recipes' parameter ranges read from both pipelines (albumentations objects
vs kornia modules); each batched RandAugment op against torchvision.transforms.v2.functional
with tests/test_randaugment.py's images, values and tolerances; Cutout's geometry; view
statistics close to the CPU path's. The last two tests are Ray Train jobs (slow): a 2-worker
SimCLR job with augment: device has a loss close to the cpu path's, and FixMatch runs with it.
"""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from test_randaugment import (
    VALUES,
    assert_like_reference,
    natural_image,
)

from lowlabel.data import augment as cpu
from lowlabel.data import device_augment as dev
from lowlabel.data.augment import RANDAUGMENT_OPS, randaugment_spans

MEAN, STD = 0.5, 0.25


def stats(channels: int) -> tuple[list[float], list[float]]:
    return [MEAN] * channels, [STD] * channels


def views(channels: int, size: int, crop_scale=(0.2, 1.0)) -> dict[str, dev.DeviceView]:
    mean, std = stats(channels)
    return {
        "contrastive": dev.contrastive_view(size, channels, mean, std, crop_scale=crop_scale),
        "weak": dev.weak_view(size, mean, std),
        "strong": dev.strong_view(size, channels, mean, std, num_ops=2, magnitude=10, cutout=0.5),
        "eval": dev.eval_view(mean, std),
    }


def batch_of(image: np.ndarray, n: int) -> torch.Tensor:
    """``n`` copies of one (H, W, C) uint8 image as a (n, C, H, W) batch."""
    return dev.uint8_batch(np.repeat(image[None], n, axis=0))


# --------------------------------------------------------------------------- randomness, shapes


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["contrastive", "weak", "strong"])
def test_per_sample_parameters_and_seeding(name, channels, one_torch_thread):
    view = views(channels, 32)[name]
    batch = batch_of(natural_image(channels), 16)  # one image 16 times: any difference is the augmentation
    out = view(batch, seed=123)
    assert len({out[i].numpy().tobytes() for i in range(len(out))}) >= 14  # flips alone may tie a few (weak)
    assert torch.equal(out, view(batch, seed=123))  # one seed, one batch of views
    assert torch.equal(out, views(channels, 32)[name](batch, seed=123))  # a fresh view object too
    assert not torch.equal(out, view(batch, seed=124))
    # The global RNG is left alone: kornia's draws are made under a forked, reseeded RNG.
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    view(batch, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_contrastive_crops_differ_within_a_batch(one_torch_thread):
    # A ramp image: the crop's box shows as each view's range of columns/rows.
    ramp = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 1))
    view = dev.ContrastiveView(32, 1, *stats(1), crop_scale=(0.2, 0.5))
    view.steps = view.steps[:1]  # the crop alone
    out = view(batch_of(ramp, 2), seed=0)
    assert not torch.allclose(out[0], out[1])


def test_batch_seed_is_distinct_per_coordinate():
    seeds = {dev.batch_seed(s, e, t, r, v) for s in range(2) for e in range(3) for t in range(4) for r in range(2) for v in range(2)}
    assert len(seeds) == 2 * 3 * 4 * 2 * 2
    assert dev.batch_seed(0, 1, 2, 3, 4) == dev.batch_seed(0, 1, 2, 3, 4)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 96])
def test_shapes_and_dtypes(size, channels, one_torch_thread):
    batch = torch.randint(0, 256, (4, channels, size, size), dtype=torch.uint8)
    for name, view in views(channels, size).items():
        out = view(batch, seed=1)
        assert out.shape == (4, channels, size, size) and out.dtype == torch.float32, name
        assert torch.isfinite(out).all()
        assert out.min() >= (0 - MEAN) / STD - 1e-5 and out.max() <= (1 - MEAN) / STD + 1e-5, name
    expected = (batch.float() / 255 - MEAN) / STD
    assert torch.allclose(views(channels, size)["eval"](batch, seed=0), expected)
    with pytest.raises(TypeError, match="uint8"):
        views(channels, size)["eval"](batch.float(), seed=0)


def test_resolve_augment():
    assert dev.resolve_augment("cpu", torch.device("cuda")) == "cpu"
    assert dev.resolve_augment("device", "cpu") == "device"
    assert dev.resolve_augment("auto", torch.device("cuda")) == "device"
    assert dev.resolve_augment("auto", torch.device("cpu")) in ("cpu", "device")
    with pytest.raises(ValueError, match=r"runtime\.augment"):
        dev.resolve_augment("gpu", "cpu")


# --------------------------------------------------------------------------- recipe ranges


def _albu(view: cpu.View, kind: type) -> A.BasicTransform | None:
    return next((t for t in view.pipeline.transforms if isinstance(t, kind)), None)


def _kornia(steps: torch.nn.Sequential, name: str):
    return next((m for m in steps if type(m).__name__ == name), None)


def _sampled(generator, name: str) -> tuple[float, float]:
    sampler = getattr(generator, f"{name}_sampler", None)
    if sampler is None:  # not drawn: the neutral value
        return (0.0, 0.0) if name == "hue" else (1.0, 1.0)
    return (float(sampler.low), float(sampler.high))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("crop_scale", [(0.2, 1.0), (0.08, 1.0)])
def test_contrastive_ranges_equal_the_cpu_recipe(channels, crop_scale):
    mean, std = stats(channels)
    albu = cpu.contrastive_view(32, channels, mean, std, crop_scale=crop_scale)
    steps = dev.contrastive_view(32, channels, mean, std, crop_scale=crop_scale).steps

    crop, kcrop = _albu(albu, A.RandomResizedCrop), _kornia(steps, "RandomResizedCrop")
    assert tuple(kcrop._param_generator.scale) == tuple(crop.scale)
    assert kcrop._param_generator.ratio == pytest.approx(crop.ratio)
    assert tuple(kcrop._param_generator.output_size) == tuple(crop.size)
    assert kcrop.p == crop.p == 1.0

    assert _kornia(steps, "RandomHorizontalFlip").p == _albu(albu, A.HorizontalFlip).p

    jitter, kjitter = _albu(albu, A.ColorJitter), _kornia(steps, "ColorJitter")
    assert kjitter.p == jitter.p
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert _sampled(kjitter._param_generator, name) == pytest.approx(tuple(getattr(jitter, name)), abs=1e-6), name

    gray, kgray = _albu(albu, A.ToGray), _kornia(steps, "RandomGrayscale")
    assert (gray is None) == (kgray is None) == (channels == 1)
    if gray is not None:
        assert kgray.p == gray.p and gray.method == "weighted_average"  # kornia's default weights: the same
    assert [type(m).__name__ for m in steps] == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "RandomGrayscale"][: len(steps)]


def test_weak_ranges_equal_the_cpu_recipe():
    albu, steps = cpu.weak_view(32, *stats(1)), dev.weak_view(32, *stats(1)).steps
    assert steps.flip.p == _albu(albu, A.HorizontalFlip).p
    affine = _albu(albu, A.Affine)
    assert affine.p == 1.0
    for axis in ("x", "y"):
        assert (-steps.translate.fraction, steps.translate.fraction) == tuple(affine.translate_percent[axis])
    assert affine.border_mode == 4  # OpenCV's BORDER_REFLECT_101, as shift_reflect
    row = torch.arange(6, dtype=torch.float32).view(1, 1, 1, 6).repeat(2, 1, 6, 1)
    shifted = dev.shift_reflect(row, torch.tensor([2, -2]), torch.tensor([0, 0]))
    assert shifted[0, 0, 0].tolist() == [2, 1, 0, 1, 2, 3] and shifted[1, 0, 0].tolist() == [2, 3, 4, 5, 4, 3]


@pytest.mark.parametrize("size", [28, 32])
def test_weak_shifts_have_the_cpu_recipes_distribution(size):
    """albumentations moves whole pixels, trunc(U[-1/8, 1/8] * side): measured on a ramp, both paths."""
    ramp = np.tile((np.arange(size) * 4 + 50).astype(np.uint8)[None, :, None], (size, 1, 1))
    centre = size // 2
    translate = A.Compose([_albu(cpu.weak_view(size, *stats(1)), A.Affine)], seed=0)
    albu = []
    for seed in range(400):
        translate.set_random_seed(seed)
        albu.append((int(translate(image=ramp)["image"][centre, centre, 0]) - int(ramp[centre, centre, 0])) // 4)
    x = batch_of(ramp, 4000).float()
    ours = (dev.Translate(0.125)(x, torch.Generator().manual_seed(0))[:, 0, centre, centre] - float(ramp[centre, centre, 0])) / 4
    limit = int(0.125 * size - 1e-9)
    assert set(albu) == set(ours.long().tolist()) == set(range(-limit, limit + 1))
    assert np.mean(np.array(albu) == 0) == pytest.approx((ours == 0).float().mean().item(), abs=0.07)  # zero twice as often


def test_strong_view_draws_the_cpu_recipes_ops_and_ranges():
    view = dev.StrongView(3, *stats(3), num_ops=2, magnitude=10)
    spans = randaugment_spans(10)
    assert view.ops == list(RANDAUGMENT_OPS) and len(view.ops) == 14
    which, values = view.sample(4000, torch.Generator().manual_seed(0))
    assert which.shape == values.shape == (2, 4000)
    counts = torch.bincount(which.flatten(), minlength=14)
    assert counts.min() > 0.6 * counts.float().mean()  # uniform over the 14 ops
    assert ((which[0] == which[1]).float().mean() - 1 / 14).abs() < 0.02  # with replacement
    for k, name in enumerate(view.ops):
        v = values[which == k]
        low, high = spans.get(name, (0.0, 0.0))
        assert v.min() >= low - 1e-9 and v.max() <= high + 1e-9, name
        if name == "Posterize":
            assert set(v.tolist()) == set(range(int(low), int(high) + 1))  # integers, both ends
        elif high > low:
            assert v.min() < low + 0.1 * (high - low) and v.max() > high - 0.1 * (high - low), name


# --------------------------------------------------------------------------- ops vs torchvision


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", RANDAUGMENT_OPS)
def test_op_matches_torchvision(name, channels):
    """The same values and tolerances as the CPU ops' test; measured: every op identical."""
    for seed in (0, 1):
        image = natural_image(channels, seed)
        values = VALUES[name]
        batch = batch_of(image, len(values))
        per_sample = dev.apply_op(name, batch, torch.tensor(values, dtype=torch.float64))  # one value per sample
        for i, v in enumerate(values):
            ours = dev.apply_op(name, batch[:1], v)[0].permute(1, 2, 0).numpy()
            assert np.array_equal(ours, per_sample[i].permute(1, 2, 0).numpy()), (name, v)
            assert_like_reference(name, channels, image, v, ours)


def test_randaugment_applies_the_drawn_ops_per_sample():
    image = natural_image(3)
    view = dev.StrongView(3, *stats(3), num_ops=2, magnitude=10, cutout=0)
    batch = batch_of(image, 32)
    generator = torch.Generator().manual_seed(3)
    out = view.randaugment(batch, generator)
    which, values = view.sample(32, torch.Generator().manual_seed(3))
    for i in range(32):
        expected = batch[i : i + 1]
        for slot in range(2):
            expected = dev.apply_op(view.ops[int(which[slot, i])], expected, float(values[slot, i]))
        assert torch.equal(out[i], expected[0]), i


@pytest.mark.parametrize("channels", [1, 3])
def test_cutout_is_a_square_up_to_the_given_fraction(channels):
    size = 32
    zeros = torch.zeros(400, channels, size, size, dtype=torch.uint8)
    out = dev.cutout(zeros, torch.Generator().manual_seed(0), max_fraction=0.5)
    sides = set()
    for image in out:
        filled = (image == 127).all(0).numpy()
        assert ((image == 127).any(0).numpy() == filled).all()  # every channel
        if not filled.any():
            continue
        rows, cols = np.flatnonzero(filled.any(1)), np.flatnonzero(filled.any(0))
        assert filled[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # one rectangle
        height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert max(height, width) <= size // 2
        if rows[0] > 0 and cols[0] > 0 and rows[-1] < size - 1 and cols[-1] < size - 1:
            assert height == width
            sides.add(height)
    assert len(sides) >= 8


# --------------------------------------------------------------------------- against the CPU path


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["contrastive", "weak", "strong"])
def test_view_statistics_close_to_the_cpu_path(name, channels, one_torch_thread):
    """Per-sample mean and spread of 256 views of one image: the two paths draw from the same recipe."""
    size, n = 32, 256
    mean, std = stats(channels)
    image = natural_image(channels, seed=2)
    recipes = {
        "contrastive": cpu.contrastive_view(size, channels, mean, std),
        "weak": cpu.weak_view(size, mean, std),
        "strong": cpu.strong_view(size, channels, mean, std, num_ops=2, magnitude=10, cutout=0.5),
    }
    albu = torch.stack([recipes[name](image, seed) for seed in range(n)])
    ours = views(channels, size)[name](batch_of(image, n), seed=0)
    for what in (lambda x: x.mean(dim=(1, 2, 3)), lambda x: x.std(dim=(1, 2, 3))):
        a, b = what(albu), what(ours)
        # means within 0.1 standard units plus 4 standard errors; spreads within 25%
        assert (a.mean() - b.mean()).abs() < 0.1 + 4 * (a.std() ** 2 / n + b.std() ** 2 / n).sqrt(), (name, a.mean(), b.mean())
        assert 0.75 < (b.std() + 1e-3) / (a.std() + 1e-3) < 1.33, (name, a.std(), b.std())
    # and per pixel, the average view
    assert (albu.mean(0) - ours.mean(0)).abs().mean() < 0.15, name


# --------------------------------------------------------------------------- Ray Train jobs


@pytest.mark.slow
def test_pretrain_job_device_augment_loss_close_to_cpu(ray_two_cpus, tiny_prepared, mlflow_uri, tmp_path):
    from test_ray_train import new_run, pretrain_config

    from lowlabel.runner.launch import run_training_job
    from lowlabel.runner.worker import read_state
    from lowlabel.train.pretrain import pretrain_loop

    client, run_id = new_run(mlflow_uri)
    losses = {}
    for augment in ("cpu", "device"):
        if augment == "device":
            run_id = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
        config = pretrain_config(tiny_prepared, mlflow_uri, run_id, epochs=3) | {"augment": augment, "knn_bank_size": 40}
        result = run_training_job(
            pretrain_loop, config, name=f"t-aug-{augment}", workers=2, use_gpu=False, cpus_per_worker=1, storage_path=str(tmp_path / augment)
        )
        assert result.error is None
        history = read_state(result.checkpoint)["history"]
        assert [h["epoch"] for h in history] == [0, 1, 2, 3]
        losses[augment] = torch.tensor([h["loss"] for h in history[1:]])
    print("per-epoch loss, cpu vs device augmentation:", {k: [round(v, 4) for v in x.tolist()] for k, x in losses.items()})
    assert torch.isfinite(losses["device"]).all()
    # 160 images, 5 steps of 2 x 16 per epoch; the loss falls ~0.26 over the 3 epochs. The two paths'
    # per-epoch losses agree to a few percent, not bit for bit (measured: 4.522/4.258/4.261 on cpu vs
    # 4.522/4.252/4.283 on device, under 1%).
    assert ((losses["device"] - losses["cpu"]).abs() / losses["cpu"]).max() < 0.05, losses


@pytest.mark.slow
def test_semisup_fixmatch_job_device_augment(ray_two_cpus, tiny_prepared, mlflow_uri, tmp_path):
    from test_ray_train import fixmatch_config, new_run

    from lowlabel.runner.launch import run_training_job
    from lowlabel.runner.worker import read_state
    from lowlabel.train.semisup import semisup_loop

    config = fixmatch_config(tiny_prepared, mlflow_uri, new_run(mlflow_uri)[1], label="t-fixmatch-device", ema_decay=0.99) | {"augment": "device"}
    result = run_training_job(semisup_loop, config, name="t-fixmatch-device", workers=2, use_gpu=False, cpus_per_worker=1, storage_path=str(tmp_path / "ray"))
    assert result.error is None
    history = read_state(result.checkpoint)["history"]
    assert [h["step"] for h in history] == [3, 6]
    assert all(np.isfinite(h["loss"]) and 0 <= h["test_acc"] <= 1 for h in history)


def test_cpu_weak_view_draws_flip_and_shift_independently():
    """albumentations 2.0.8's Compose.set_random_seed seeds every transform alike, so their draws
    coincide (every flipped weak view was shifted one way in x); View draws all transforms from
    one generator pair instead. Each of the four (flip, shift sign) pairs must occur."""
    image = natural_image(1, seed=2)
    view = cpu.weak_view(32, *stats(1))
    x = dev.uint8_batch(image[None]).float()
    candidates = {
        (flip, dx, dy): (dev.shift_reflect(x.flip(-1) if flip else x, torch.tensor([dx]), torch.tensor([dy])) / 255 - MEAN) / STD
        for flip in (0, 1)
        for dx in range(-3, 4)
        for dy in range(-3, 4)
    }
    signs = set()
    for seed in range(60):
        out = view(image, seed)
        (flip, dx, _), = [k for k, c in candidates.items() if torch.allclose(c[0], out, atol=1e-5)]
        signs.add((flip, int(np.sign(dx))))
    assert {(0, 1), (0, -1), (1, 1), (1, -1)} <= signs
