"""Tests for lowlabel.data.sources: IDX parsing, Fashion-MNIST lookup, image folders, errors."""

from __future__ import annotations

import gzip
import io
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowlabel.data import sources
from lowlabel.data.sources import DataSourceError, RawDataset, load_source, read_idx

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# --------------------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX (magic 0x0000 08 <ndim>, big-endian dims, data)."""
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def write_idx(directory: Path, name: str, arr: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(arr)
    if gz:
        path = directory / f"{name}.gz"
        path.write_bytes(gzip.compress(data))
    else:
        path = directory / name
        path.write_bytes(data)
    return path


def make_fashion(directory: Path, gz: bool | list[bool] = True, n_train: int = 7, n_test: int = 3):
    """Write four tiny IDX files with known content; returns the arrays written."""
    rng = np.random.default_rng(123)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    flags = gz if isinstance(gz, list) else [gz] * 4
    paths = {}
    for (key, arr), flag in zip(arrays.items(), flags):
        paths[key] = write_idx(directory, IDX_NAMES[key], arr, flag)
    return arrays, paths


@pytest.fixture
def no_default_dirs(tmp_path, monkeypatch):
    """Point the Debian and cache directories somewhere empty so only `root` can match."""
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no-debian"))
    monkeypatch.setattr(sources, "DEFAULT_CACHE_DIR", str(tmp_path / "no-cache"))
    return tmp_path


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_img(path: Path, rng: np.random.Generator, mode: str, size=(10, 12)) -> np.ndarray:
    """Save a random image (PIL size = (W, H)); returns its pixel array."""
    w, h = size
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return arr


@pytest.fixture
def folder(tmp_path):
    """3 classes x 6 PNGs (10x12, class 'a' RGB, 'b' gray, 'c' mixed) + 2 broken files."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls, modes in {"a": ["RGB"] * 6, "b": ["L"] * 6, "c": ["RGB", "L"] * 3}.items():
        for i, mode in enumerate(modes):
            save_img(root / cls / f"{i:02d}.png", rng, mode)
    corrupt = root / "a" / "zz_corrupt.png"
    corrupt.write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    good = png_bytes(Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8), mode="L"))
    truncated = root / "b" / "zz_truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    (root / "c" / "notes.txt").write_text("not an image, ignored")
    return root, [str(corrupt), str(truncated)]


def gray_folder(root: Path, n_per_class: int = 6, size=(10, 12)) -> Path:
    rng = np.random.default_rng(1)
    for cls in ("x", "y"):
        for i in range(n_per_class):
            save_img(root / cls / f"{i}.png", rng, "L", size)
    return root


# --------------------------------------------------------------------------- IDX / Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False, [True, False, False, True]], ids=["gz", "raw", "mixed"])
def test_idx_roundtrip(no_default_dirs, gz):
    root = no_default_dirs / "fm"
    root.mkdir()
    arrays, _ = make_fashion(root, gz)
    ds = load_source("fashion_mnist", root=str(root))
    assert isinstance(ds, RawDataset)
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train_images"])
    np.testing.assert_array_equal(ds.test_images[..., 0], arrays["test_images"])
    np.testing.assert_array_equal(ds.train_labels, arrays["train_labels"])
    np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])
    assert ds.train_images.shape == (7, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int64 and ds.test_labels.dtype == np.int64
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[-1] == "Ankle boot"
    assert len(ds.class_names) == 10 and ds.skipped == []


def test_read_idx_generic_dims(tmp_path):
    arr = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    path = write_idx(tmp_path, "x-idx4", arr, gz=False)
    out = read_idx(path)
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0, 0] = 7  # writable, not a view on immutable bytes


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_truncated_idx_names_file(no_default_dirs, gz):
    root = no_default_dirs / "fm"
    root.mkdir()
    _, paths = make_fashion(root, gz)
    victim = paths["train_images"]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 50])
    with pytest.raises(DataSourceError) as exc:
        load_source("fashion_mnist", root=str(root))
    assert victim.name in str(exc.value)


def test_truncated_header_and_trailing_bytes(tmp_path):
    short = tmp_path / "short-idx"
    short.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DataSourceError, match="short-idx.*truncated"):
        read_idx(short, 2051)
    long = tmp_path / "long-idx"
    long.write_bytes(idx_bytes(np.zeros((2, 3), np.uint8)) + b"\x00")
    with pytest.raises(DataSourceError, match="long-idx.*longer"):
        read_idx(long)


def test_wrong_magic(no_default_dirs):
    root = no_default_dirs / "fm"
    root.mkdir()
    make_fashion(root, gz=False)
    # A labels file (magic 2049) where the images file (2051) is expected.
    write_idx(root, IDX_NAMES["test_images"], np.zeros(3, np.uint8), gz=False)
    with pytest.raises(DataSourceError, match=r"t10k-images-idx3-ubyte.*magic number 2049.*2051"):
        load_source("fashion_mnist", root=str(root))


def test_label_count_mismatch(no_default_dirs):
    root = no_default_dirs / "fm"
    root.mkdir()
    make_fashion(root, gz=False)
    write_idx(root, IDX_NAMES["train_labels"], np.zeros(5, np.uint8), gz=False)
    with pytest.raises(DataSourceError, match="7 images.*5 labels"):
        load_source("fashion_mnist", root=str(root))


def test_fashion_resize_and_channels(no_default_dirs):
    root = no_default_dirs / "fm"
    root.mkdir()
    arrays, _ = make_fashion(root)
    ds = load_source("fashion_mnist", root=str(root), image_size=32, channels=3)
    assert ds.train_images.shape == (7, 32, 32, 3) and ds.test_images.shape == (3, 32, 32, 3)
    expected = np.asarray(
        Image.fromarray(arrays["train_images"][0]).resize((32, 32), Image.Resampling.BILINEAR)
    )
    for c in range(3):
        np.testing.assert_array_equal(ds.train_images[0, :, :, c], expected)
    same = load_source("fashion_mnist", root=str(root), image_size=28, channels=1)
    np.testing.assert_array_equal(same.train_images[..., 0], arrays["train_images"])


def test_rgb_to_gray_matches_pil():
    rgb = np.random.default_rng(5).integers(0, 256, (4, 6, 7, 3), dtype=np.uint8)
    gray = sources._to_channels(rgb, 1)
    ref = np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in rgb])
    assert gray.shape == (4, 6, 7, 1)
    np.testing.assert_array_equal(gray[..., 0], ref)


def test_fashion_missing_gives_clear_error(no_default_dirs):
    with pytest.raises(DataSourceError) as exc:
        load_source("fashion_mnist")
    msg = str(exc.value)
    assert "no-debian" in msg and "no-cache" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "data.root" in msg and "data.download: true" in msg
    empty = no_default_dirs / "empty"
    empty.mkdir()
    with pytest.raises(DataSourceError, match="empty"):
        load_source("fashion_mnist", root=str(empty))


def test_fashion_download_failure_names_url(no_default_dirs, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(sources.urllib.request, "urlopen", offline)
    target = no_default_dirs / "dl"
    with pytest.raises(DataSourceError) as exc:
        load_source("fashion_mnist", root=str(target), download=True)
    assert sources.FASHION_MNIST_URL in str(exc.value) and "idx" in str(exc.value)
    assert not list(target.glob("*.part"))


def test_fashion_download_path_with_fake_server(no_default_dirs, monkeypatch):
    """The download path, fed from memory instead of the network."""
    src = no_default_dirs / "src"
    src.mkdir()
    arrays, paths = make_fashion(src, gz=True)
    by_url = {sources.FASHION_MNIST_URL + p.name: p.read_bytes() for p in paths.values()}
    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(by_url[url]))
    target = no_default_dirs / "dl"
    ds = load_source("fashion_mnist", root=str(target), download=True)
    np.testing.assert_array_equal(ds.test_images[..., 0], arrays["test_images"])
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in paths.values())


def test_fashion_debian_files():
    if not Path(sources.DEBIAN_FASHION_MNIST_DIR).is_dir():
        pytest.skip(f"{sources.DEBIAN_FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)")
    ds = load_source("fashion_mnist")
    assert ds.train_images.shape == (60000, 28, 28, 1)
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.train_images.dtype == np.uint8
    assert ds.train_labels.min() == 0 and ds.train_labels.max() == 9
    assert ds.test_labels.min() == 0 and ds.test_labels.max() == 9
    np.testing.assert_array_equal(np.bincount(ds.train_labels, minlength=10), [6000] * 10)


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_skip_mode(folder):
    root, broken = folder
    with pytest.warns(UserWarning, match="skipped 2"):
        ds = load_source("imagefolder", str(root))
    assert sorted(p for p, _ in ds.skipped) == sorted(broken)
    assert all(reason for _, reason in ds.skipped)
    assert ds.class_names == ["a", "b", "c"]
    # 6 readable per class, test_fraction 0.2 -> 1 test + 5 train per class.
    assert ds.train_images.shape == (15, 12, 10, 3) and ds.test_images.shape == (3, 12, 10, 3)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [5, 5, 5])
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [1, 1, 1])
    # Gray class 'b' was expanded to RGB by repetition.
    b = ds.train_images[ds.train_labels == 1]
    np.testing.assert_array_equal(b[..., 0], b[..., 2])


def test_imagefolder_error_mode_lists_all(folder):
    root, broken = folder
    with pytest.raises(DataSourceError) as exc:
        load_source("imagefolder", str(root), on_corrupt="error")
    msg = str(exc.value)
    assert "2 corrupt" in msg
    for path in broken:
        assert path in msg


def test_imagefolder_pixels_and_channels(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "r"
    arrays = {cls: save_img(root / cls / "0.png", rng, "RGB") for cls in ("p", "q")}
    for cls in ("p", "q"):
        save_img(root / cls / "1.png", rng, "RGB")
    ds = load_source("imagefolder", str(root), test_fraction=0.5, seed=0)
    all_x = np.concatenate([ds.train_images, ds.test_images])
    assert any(np.array_equal(x, arrays["p"]) for x in all_x)
    gray = load_source("imagefolder", str(root), channels=1, test_fraction=0.5)
    assert gray.train_images.shape[-1] == 1
    ref = np.asarray(Image.fromarray(arrays["q"]).convert("L"))
    all_g = np.concatenate([gray.train_images, gray.test_images])[..., 0]
    assert any(np.array_equal(x, ref) for x in all_g)


def test_imagefolder_auto_gray(tmp_path):
    ds = load_source("imagefolder", str(gray_folder(tmp_path / "g")))
    assert ds.train_images.shape[1:] == (12, 10, 1)
    rgb = load_source("imagefolder", str(tmp_path / "g"), channels=3)
    assert rgb.train_images.shape[1:] == (12, 10, 3)


def test_imagefolder_resize(folder):
    root, _ = folder
    with pytest.warns(UserWarning):
        ds = load_source("imagefolder", str(root), image_size=8, channels=1)
    assert ds.train_images.shape == (15, 8, 8, 1) and ds.test_images.shape == (3, 8, 8, 1)


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    root = gray_folder(tmp_path / "g")
    save_img(root / "x" / "big.png", np.random.default_rng(0), "L", size=(20, 20))
    with pytest.raises(DataSourceError, match="data.image_size"):
        load_source("imagefolder", str(root))
    ds = load_source("imagefolder", str(root), image_size=16)
    assert ds.train_images.shape[1:] == (16, 16, 1)


def test_imagefolder_split_determinism_and_stratification(folder):
    root, _ = folder
    with pytest.warns(UserWarning):
        a = load_source("imagefolder", str(root), seed=7)
        b = load_source("imagefolder", str(root), seed=7)
        others = [load_source("imagefolder", str(root), seed=s) for s in range(1, 6)]
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert any(not np.array_equal(a.test_images, o.test_images) for o in others)
    with pytest.warns(UserWarning):
        half = load_source("imagefolder", str(root), test_fraction=0.5, seed=7)
    np.testing.assert_array_equal(np.bincount(half.test_labels), [3, 3, 3])
    np.testing.assert_array_equal(np.bincount(half.train_labels), [3, 3, 3])
    # Train and test are disjoint and together hold every readable image.
    every = np.concatenate([half.train_images, half.test_images]).reshape(18, -1)
    assert len({row.tobytes() for row in every}) == 18


def test_imagefolder_small_classes(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "r"
    save_img(root / "one" / "0.png", rng, "L")
    for i in range(2):
        save_img(root / "two" / f"{i}.png", rng, "L")
    ds = load_source("imagefolder", str(root), test_fraction=0.01)
    np.testing.assert_array_equal(ds.train_labels, [0, 1])  # singleton class stays in train
    np.testing.assert_array_equal(ds.test_labels, [1])  # >= 1 test image when a class has >= 2


def test_imagefolder_train_test_layout(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "r"
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("dog", "cat"):
            for i in range(n):
                save_img(root / split / cls / f"{i}.png", rng, "RGB")
    ds = load_source("imagefolder", str(root))
    assert ds.class_names == ["cat", "dog"]
    assert ds.train_images.shape == (6, 12, 10, 3) and ds.test_images.shape == (4, 12, 10, 3)
    np.testing.assert_array_equal(ds.train_labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.test_labels, [0, 0, 1, 1])

    save_img(root / "train" / "bird" / "0.png", rng, "RGB")
    save_img(root / "test" / "fish" / "0.png", rng, "RGB")
    with pytest.raises(DataSourceError) as exc:
        load_source("imagefolder", str(root))
    assert "bird" in str(exc.value) and "fish" in str(exc.value)


def test_imagefolder_train_without_test(tmp_path):
    save_img(tmp_path / "r" / "train" / "a" / "0.png", np.random.default_rng(0), "L")
    with pytest.raises(DataSourceError, match="no test/"):
        load_source("imagefolder", str(tmp_path / "r"))


def test_imagefolder_root_errors(tmp_path):
    with pytest.raises(DataSourceError, match="data.root"):
        load_source("imagefolder")
    with pytest.raises(DataSourceError, match="data.root.*not a directory"):
        load_source("imagefolder", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no class folders"):
        load_source("imagefolder", str(tmp_path / "empty"))


def test_imagefolder_bad_class_folders(tmp_path):
    root = gray_folder(tmp_path / "g")
    (root / "z_empty").mkdir()
    with pytest.raises(DataSourceError, match="z_empty.*no images"):
        load_source("imagefolder", str(root))
    (root / "z_empty" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataSourceError, match="z_empty.*no readable images"):
        load_source("imagefolder", str(root))
    with pytest.raises(DataSourceError, match="1 corrupt.*bad.jpg"):
        load_source("imagefolder", str(root), on_corrupt="error")


# --------------------------------------------------------------------------- other sources / settings


def test_unknown_source_lists_allowed():
    with pytest.raises(DataSourceError) as exc:
        load_source("mnist-ish")
    for name in ("fashion_mnist", "imagefolder", "cifar10", "stl10"):
        assert name in str(exc.value)
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("source", ["cifar10", "stl10"])
def test_torchvision_missing_without_download(tmp_path, source):
    with pytest.raises(DataSourceError) as exc:
        load_source(source, str(tmp_path), download=False)
    msg = str(exc.value)
    assert "data.download: true" in msg and str(tmp_path) in msg


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"image_size": 0}, "data.image_size"),
        ({"channels": 2}, "data.channels"),
        ({"on_corrupt": "ignore"}, "data.on_corrupt"),
        ({"test_fraction": 1.0}, "data.test_fraction"),
    ],
)
def test_invalid_settings(tmp_path, kwargs, field):
    root = gray_folder(tmp_path / "g")
    with pytest.raises(DataSourceError, match=field):
        load_source("imagefolder", str(root), **kwargs)


def test_glyphs_source_splits_each_class_into_train_and_test():
    from lowlabel.data.glyphs import missing_font_packages

    if missing_font_packages():
        pytest.skip("glyph fonts not installed (./pipeline setup installs them)")
    ds = load_source("glyphs", glyph_classes=12, glyph_instances=8, image_size=20, test_fraction=0.25, seed=3)
    assert ds.train_images.shape == (12 * 6, 20, 20, 1) and ds.test_images.shape == (12 * 2, 20, 20, 1)
    assert np.bincount(ds.test_labels).tolist() == [2] * 12
    again = load_source("glyphs", glyph_classes=12, glyph_instances=8, image_size=20, test_fraction=0.25, seed=3)
    assert np.array_equal(ds.train_images, again.train_images)
