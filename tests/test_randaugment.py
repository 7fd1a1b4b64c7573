"""RandAugment as published: each of the 14 ops against torchvision.transforms.v2.functional
(the reference: PIL's ops on tensors), the ops' random order, the square Cutout, per-sample seeding.

Each op is made deterministic by giving its range equal ends, then run through an albumentations
Compose as in the strong view, on 32x32 uint8 images (smooth gradients + texture + noise) with one
and three channels.
"""

import math

import albumentations as A
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F

from lowlabel.data.augment import (
    RANDAUGMENT_OPS,
    Cutout,
    Sharpness,
    randaugment_op,
    randaugment_ops,
    square_cutout,
    strong_view,
)

SIZE = 32
NEAREST = F.InterpolationMode.NEAREST


def natural_image(channels: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """A smooth gradient + a low-frequency wave + noise per channel: a full, uneven histogram."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    planes = []
    for _ in range(channels):
        a, b, phase = rng.uniform(-1, 1, 3)
        plane = 128 + 70 * (a * x + b * y) + 30 * np.sin(6 * x + 4 * y + 3 * phase) + rng.normal(0, 8, (size, size))
        planes.append(plane)
    return np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8)


def run(op: A.BasicTransform, image: np.ndarray, seed: int = 0) -> np.ndarray:
    out = A.Compose([op], seed=seed)(image=image)["image"]
    return out if out.ndim == 3 else out[..., None]


def reference(name: str, image: np.ndarray, v: float) -> np.ndarray:
    x = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    fill = [127.0] * image.shape[-1]
    h, w = image.shape[:2]
    ops = {
        "Identity": lambda: x,
        "AutoContrast": lambda: F.autocontrast(x),
        "Equalize": lambda: F.equalize(x),
        "Rotate": lambda: F.rotate(x, v, interpolation=NEAREST, fill=fill),
        "Solarize": lambda: F.solarize(x, 255 * v),
        "Posterize": lambda: F.posterize(x, int(v)),
        "Brightness": lambda: F.adjust_brightness(x, v),
        "Contrast": lambda: F.adjust_contrast(x, v),
        "Color": lambda: F.adjust_saturation(x, v),
        "Sharpness": lambda: F.adjust_sharpness(x, v),
        "ShearX": lambda: F.affine(x, 0.0, [0.0, 0.0], 1.0, [v, 0.0], interpolation=NEAREST, fill=fill),
        "ShearY": lambda: F.affine(x, 0.0, [0.0, 0.0], 1.0, [0.0, v], interpolation=NEAREST, fill=fill),
        # Whole pixels, truncated: torchvision's RandAugment passes int(magnitude), albumentations int(v * side).
        "TranslateX": lambda: F.affine(x, 0.0, [int(v * w), 0], 1.0, [0.0, 0.0], interpolation=NEAREST, fill=fill),
        "TranslateY": lambda: F.affine(x, 0.0, [0, int(v * h)], 1.0, [0.0, 0.0], interpolation=NEAREST, fill=fill),
    }
    return ops[name]().permute(1, 2, 0).numpy()


SHEAR_M10, SHEAR_M30 = math.degrees(math.atan(0.1)), math.degrees(math.atan(0.3))
# Parameters at the range ends for magnitudes 10 and 30 (0-30 scale), plus one in between.
VALUES = {
    "Identity": [0.0],
    "AutoContrast": [0.0],
    "Equalize": [0.0],
    "Rotate": [-10.0, 10.0, 30.0, -17.3],
    "Solarize": [2 / 3, 0.0, 0.45],
    "Posterize": [7, 4, 5],
    "Brightness": [0.7, 1.3, 0.1, 1.9],
    "Contrast": [0.7, 1.3, 0.1, 1.9],
    "Color": [0.7, 1.3, 0.1, 1.9],
    "Sharpness": [0.7, 1.3, 0.1, 1.9],
    "ShearX": [-SHEAR_M10, SHEAR_M10, SHEAR_M30],
    "ShearY": [-SHEAR_M10, SHEAR_M10, -SHEAR_M30],
    "TranslateX": [-0.15, 0.15, 0.45, 0.1],
    "TranslateY": [-0.15, 0.15, -0.45, 0.1],
}
# Point ops: the largest grey-level difference allowed. The same integer arithmetic is exact; float
# blends and AutoContrast's stretch may land one level apart (albumentations rounds, torchvision
# truncates). Color blends with a grey image that OpenCV (like PIL) rounds and torchvision floors: at
# factor 0.1 (magnitude 30) that can add a level (2; at most 1 up to magnitude 10, and PIL's own
# Color differs from torchvision's by 1).
POINT_TOLERANCE = {
    "Identity": 0, "Equalize": 0, "Solarize": 0, "Posterize": 0,
    "AutoContrast": 1, "Brightness": 1, "Contrast": 1, "Color": 2, "Sharpness": 1,
}  # fmt: skip
# Geometric ops (nearest-neighbour, same centre, fill and sign conventions as torchvision's affine):
# a rounding tie may pick the neighbouring pixel, so bound the share of differing pixels and the mean
# difference rather than the max. Measured: identical.
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
MAX_DIFFERING_SHARE, MAX_MEAN_DIFF = 0.01, 0.25


def test_the_op_set_is_the_published_one():
    assert set(POINT_TOLERANCE) | GEOMETRIC == set(RANDAUGMENT_OPS) == set(VALUES)
    assert len(RANDAUGMENT_OPS) == 14
    for channels in (1, 3):
        assert len(randaugment_ops(channels, 10)) == 14


def assert_like_reference(name: str, channels: int, image: np.ndarray, v: float, ours: np.ndarray) -> None:
    """``ours`` (op ``name`` at value ``v`` on ``image``) against torchvision's, within this file's
    tolerances; and the op does something, where it should."""
    ref = reference(name, image, v)
    assert ours.shape == ref.shape == image.shape and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - ref.astype(int))
    if name in GEOMETRIC:
        assert (diff > 0).mean() <= MAX_DIFFERING_SHARE, (name, v, (diff > 0).mean())
        assert diff.mean() <= MAX_MEAN_DIFF, (name, v, diff.mean())
    else:
        assert diff.max() <= POINT_TOLERANCE[name], (name, v, diff.max())
    if name not in ("Identity", "Posterize") and not (name == "Color" and channels == 1):
        assert not np.array_equal(ours, image), (name, v)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", RANDAUGMENT_OPS)
def test_op_matches_torchvision(name, channels):
    for seed in (0, 1):
        image = natural_image(channels, seed)
        for v in VALUES[name]:
            assert_like_reference(name, channels, image, v, run(randaugment_op(name, v, v), image))


def test_sharpness_blurs_below_one_and_keeps_the_border():
    image = natural_image(3)
    blurred, sharpened = run(randaugment_op("Sharpness", 0.0, 0.0), image), run(randaugment_op("Sharpness", 2.0, 2.0), image)
    inner = (slice(1, -1), slice(1, -1))
    roughness = [np.abs(np.diff(x[inner].astype(int), axis=1)).mean() for x in (blurred, image, sharpened)]
    assert roughness[0] < roughness[1] < roughness[2]
    for out in (blurred, sharpened):
        border = np.ones(image.shape[:2], bool)
        border[inner] = False
        assert np.array_equal(out[border], image[border])


def test_autocontrast_is_a_linear_stretch_not_equalisation():
    ramp = np.repeat(np.linspace(100, 150, SIZE).astype(np.uint8)[None, :, None], SIZE, axis=0)
    ramp[:, : SIZE // 2] = 100  # a skewed histogram: equalisation would move the midtones, a stretch does not
    out = run(randaugment_op("AutoContrast"), ramp).astype(int)
    expected = (ramp.astype(int) - 100) * 255 / 50
    assert out.min() == 0 and out.max() == 255
    assert np.abs(out - expected).max() <= 1


def test_ops_run_in_random_order():
    ra = next(t for t in strong_view(SIZE, 3, [0.5] * 3, [0.25] * 3).pipeline.transforms if isinstance(t, A.RandomOrder))
    assert ra.n == 2 and ra.replace and len(ra.transforms) == 14

    class Tag(A.ImageOnlyTransform):
        def __init__(self, tag: int, log: list[int]) -> None:
            super().__init__(p=1.0)
            self.tag, self.log = tag, log

        def apply(self, img: np.ndarray, **params: object) -> np.ndarray:
            self.log.append(self.tag)
            return img

    log: list[int] = []
    pipeline = A.Compose([A.RandomOrder([Tag(0, log), Tag(1, log)], n=ra.n, replace=ra.replace, p=1.0)], seed=0)
    image = natural_image(3)
    orders = set()
    for seed in range(200):
        log.clear()
        pipeline.set_random_seed(seed)
        pipeline(image=image)
        orders.add(tuple(log))
    assert orders == {(0, 0), (0, 1), (1, 0), (1, 1)}  # both orders of the pair, and repeats


def test_square_cutout_geometry():
    image = np.zeros((SIZE, SIZE, 1), np.uint8)
    inside = square_cutout(image, 10, (16.0, 16.0), 127)[..., 0] == 127
    assert inside.sum() == 100 and inside[11:21, 11:21].all()
    corner = square_cutout(image, 10, (0.0, 0.0), 127)[..., 0] == 127
    assert corner.sum() == 25 and corner[:5, :5].all()  # clipped at the border, as the paper's Cutout
    assert not (square_cutout(image, 0, (16.0, 16.0), 127) == 127).any()


@pytest.mark.parametrize("channels", [1, 3])
def test_cutout_is_a_square_up_to_the_given_fraction(channels):
    image = np.zeros((SIZE, SIZE, channels), np.uint8)
    op = Cutout(max_fraction=0.5, fill=127, p=1.0)
    sides = set()
    for seed in range(300):
        filled = run(op, image, seed)[..., 0] == 127
        assert (run(op, image, seed) == 127).all(axis=-1).sum() == filled.sum()  # every channel, seeded
        if not filled.any():
            continue
        rows, cols = np.flatnonzero(filled.any(1)), np.flatnonzero(filled.any(0))
        assert filled[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # one rectangle
        height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert max(height, width) <= SIZE // 2
        if rows[0] > 0 and cols[0] > 0 and rows[-1] < SIZE - 1 and cols[-1] < SIZE - 1:
            assert height == width  # clear of the border: a square
            sides.add(height)
    assert len(sides) >= 8  # the side varies


@pytest.mark.parametrize("channels", [1, 3])
def test_strong_view_same_seed_same_view_different_seeds_differ(channels):
    mean, std = [0.5] * channels, [0.25] * channels
    image = natural_image(channels)
    views = [strong_view(SIZE, channels, mean, std, num_ops=2, magnitude=10)(image, seed) for seed in range(20)]
    fresh = strong_view(SIZE, channels, mean, std, num_ops=2, magnitude=10)
    for seed in (0, 7, 19):
        assert torch.equal(fresh(image, seed), views[seed])
    assert len({v.numpy().tobytes() for v in views}) == len(views)


def test_custom_ops_draw_from_the_seeded_generator():
    image = natural_image(3)
    for op in (Sharpness(factor_range=(0.1, 1.9)), Cutout(max_fraction=0.5)):
        pipeline = A.Compose([op], seed=0)
        outs = []
        for seed in (3, 3, 4, 5):
            pipeline.set_random_seed(seed)
            outs.append(pipeline(image=image)["image"])
        assert np.array_equal(outs[0], outs[1])
        assert not np.array_equal(outs[1], outs[2]) or not np.array_equal(outs[1], outs[3])


@pytest.mark.parametrize("channels", [1, 3])
def test_every_op_keeps_shape_and_dtype_at_full_magnitude(channels):
    image = natural_image(channels)
    for op in randaugment_ops(channels, 30):
        out = run(op, image, seed=1)
        assert out.shape == image.shape and out.dtype == np.uint8, op
