"""The streamed image-folder prepare (lowlabel.data.sources.write_imagefolder, the prepare stage)
against a reference that decodes everything into memory the straightforward way (what prepare
did before it streamed): the same bytes, the same split and order, the same skipped files, for
any number of decode workers and any chunk size."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowlabel.config import ConfigError, parse_params
from lowlabel.data import sources
from lowlabel.data.prepared import (
    NpyRows,
    NpyRowWriter,
    channel_stats,
    npy_header,
    prepared_digest,
    write_prepared,
)
from lowlabel.data.sources import DataSourceError, write_imagefolder
from lowlabel.data.splits import make_split

ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


# --------------------------------------------------------------------------- reference


def reference_imagefolder(root: Path, *, image_size=None, channels=None, test_fraction=0.2, seed=0):
    """Every image decoded into memory, then stacked and split: the pre-streaming algorithm."""
    split_layout = (root / "train").is_dir() and (root / "test").is_dir()
    parts = {"train": root / "train", "test": root / "test"} if split_layout else {"all": root}
    class_names = [p.name for p in sources._class_dirs(next(iter(parts.values())))]
    entries: dict[str, list[tuple[int, np.ndarray]]] = {k: [] for k in parts}
    skipped = []
    for part, part_dir in parts.items():
        for label, name in enumerate(class_names):
            for path in sources._image_files(part_dir / name):
                try:
                    entries[part].append((label, sources._decode(path, channels, image_size)))
                except Exception as e:
                    skipped.append((str(path), f"{type(e).__name__}: {e}"))
    n_channels = channels or (3 if any(a.shape[2] == 3 for items in entries.values() for _, a in items) else 1)

    def collect(items):
        images = np.stack([np.repeat(a, 3, axis=2) if a.shape[2] != n_channels else a for _, a in items])
        return images, np.array([lab for lab, _ in items], dtype=np.int64)

    if split_layout:
        (train_x, train_y), (test_x, test_y) = collect(entries["train"]), collect(entries["test"])
    else:
        items = entries["all"]
        tr, te = sources._stratified_split(np.array([lab for lab, _ in items], dtype=np.int64), test_fraction, seed)
        (train_x, train_y), (test_x, test_y) = collect([items[i] for i in tr]), collect([items[i] for i in te])
    return {"train_images": train_x, "train_labels": train_y, "test_images": test_x, "test_labels": test_y}, class_names, skipped


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def old_channel_stats(images: np.ndarray, max_images: int = 20000, seed: int = 0):
    """channel_stats before it streamed."""
    rng = np.random.default_rng(seed)
    sample = images[np.sort(rng.permutation(len(images))[:max_images])].astype(np.float64) / 255.0
    flat = sample.reshape(-1, images.shape[-1])
    return flat.mean(0).tolist(), np.maximum(flat.std(0), 1e-3).tolist()


# --------------------------------------------------------------------------- folders


def save_image(path: Path, rng: np.random.Generator, mode: str, size: tuple[int, int], fmt: str) -> None:
    w, h = size
    arr = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path, format=fmt)


def make_folder(root: Path, *, classes=("ant", "bee", "cat", "dog"), per_class=9, modes=("RGB", "L"), sizes=((20, 16), (31, 24), (12, 12)), corrupt=True, seed=0) -> list[str]:
    """Mixed sizes, formats and modes; returns the paths of the unreadable files written."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        for i in range(per_class):
            mode = modes[(c + i) % len(modes)]
            fmt = ("PNG", "JPEG")[i % 2]
            save_image(root / name / f"{i:03d}.{fmt.lower()}", rng, mode, sizes[(c * 7 + i) % len(sizes)], fmt)
    broken = []
    if corrupt:
        bad = root / classes[1] / "004b.png"
        bad.write_bytes(b"\x89PNG not really")
        good = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(good, format="JPEG")
        truncated = root / classes[2] / "zz.jpg"
        truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
        broken = [str(bad), str(truncated)]
    return broken


def streamed(root: Path, out: Path, **kwargs):
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the skipped-files warning
        written = write_imagefolder(str(root), out, **kwargs)
    return written


def assert_same_as_reference(out: Path, written, ref_arrays, ref_classes, ref_skipped):
    for name in ARRAYS:
        assert (out / f"{name}.npy").read_bytes() == npy_bytes(ref_arrays[name]), name
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}.npy" for name in ARRAYS)  # no temporaries left
    assert written.class_names == ref_classes and written.skipped == ref_skipped
    assert (written.train_count, written.test_count) == (len(ref_arrays["train_labels"]), len(ref_arrays["test_labels"]))
    assert written.image_shape == ref_arrays["train_images"].shape[1:]


# --------------------------------------------------------------------------- equality with the reference


@pytest.mark.parametrize(
    ("image_size", "channels"),
    [(16, None), (16, 1), (16, 3), (9, None)],
    ids=["auto-channels", "gray", "rgb", "size9"],
)
@pytest.mark.parametrize(("workers", "chunk"), [(1, 128), (2, 3)], ids=["inproc", "pool"])
def test_flat_folder_same_bytes_as_reference(tmp_path, image_size, channels, workers, chunk):
    root = tmp_path / "imgs"
    broken = make_folder(root)
    ref, classes, skipped = reference_imagefolder(root, image_size=image_size, channels=channels, seed=3)
    assert sorted(p for p, _ in skipped) == sorted(broken)
    out = tmp_path / "out"
    written = streamed(root, out, image_size=image_size, channels=channels, seed=3, decode_workers=workers, decode_chunk=chunk)
    assert_same_as_reference(out, written, ref, classes, skipped)


@pytest.mark.parametrize("channels", [None, 1])
def test_gray_only_folder_keeps_one_channel(tmp_path, channels):
    root = tmp_path / "gray"
    make_folder(root, modes=("L",), sizes=((14, 10),), corrupt=False)
    ref, classes, skipped = reference_imagefolder(root, channels=channels)
    assert ref["train_images"].shape[-1] == 1
    out = tmp_path / "out"
    written = streamed(root, out, channels=channels, decode_workers=2, decode_chunk=4)
    assert_same_as_reference(out, written, ref, classes, skipped)


def test_native_size_without_image_size(tmp_path):
    root = tmp_path / "native"
    make_folder(root, sizes=((13, 11),))
    ref, classes, skipped = reference_imagefolder(root)
    out = tmp_path / "out"
    written = streamed(root, out, decode_workers=2, decode_chunk=5)
    assert written.image_shape == (11, 13, 3)
    assert_same_as_reference(out, written, ref, classes, skipped)


@pytest.mark.parametrize("channels", [None, 3])
def test_train_test_layout_same_bytes_as_reference(tmp_path, channels):
    root = tmp_path / "split"
    rng = np.random.default_rng(5)
    for part, n in (("train", 7), ("test", 3)):
        for c, name in enumerate(("x", "y", "z")):
            for i in range(n):
                save_image(root / part / name / f"{i}.png", rng, ("L", "RGB")[(c + i) % 2] if c else "L", (10, 8), "PNG")
    (root / "train" / "y" / "bad.png").write_bytes(b"junk")
    ref, classes, skipped = reference_imagefolder(root, channels=channels)
    out = tmp_path / "out"
    written = streamed(root, out, channels=channels, decode_workers=2, decode_chunk=2)
    assert_same_as_reference(out, written, ref, classes, skipped)


def test_worker_count_and_chunk_do_not_change_the_bytes(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, per_class=15)
    outputs = []
    for workers, chunk in ((1, 1), (1, 7), (2, 1), (2, 4), (2, 1000)):
        out = tmp_path / f"out-{workers}-{chunk}"
        streamed(root, out, image_size=12, decode_workers=workers, decode_chunk=chunk)
        outputs.append({name: (out / f"{name}.npy").read_bytes() for name in ARRAYS})
    assert all(o == outputs[0] for o in outputs[1:])


def test_on_corrupt_error_names_every_file_with_workers(tmp_path):
    root = tmp_path / "imgs"
    broken = make_folder(root)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataSourceError) as exc:
        write_imagefolder(str(root), out, image_size=8, on_corrupt="error", decode_workers=2, decode_chunk=2)
    assert "2 corrupt" in str(exc.value) and all(path in str(exc.value) for path in broken)
    assert list(out.iterdir()) == []  # temporaries removed


def test_skip_warns_and_names_the_files(tmp_path):
    root = tmp_path / "imgs"
    broken = make_folder(root)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.warns(UserWarning, match="skipped 2"):
        written = write_imagefolder(str(root), out, image_size=8, decode_workers=2, decode_chunk=2)
    assert sorted(p for p, _ in written.skipped) == sorted(broken) and all(reason for _, reason in written.skipped)


def test_class_errors_still_raised_when_streamed(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, corrupt=False)
    (root / "zzz").mkdir()
    (root / "zzz" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataSourceError, match="zzz.*no readable images"):
        write_imagefolder(str(root), tmp_path, image_size=8, decode_workers=2, decode_chunk=3)
    assert not list(tmp_path.glob(".decoded-*"))


def test_mixed_sizes_without_image_size(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, corrupt=False)
    with pytest.raises(DataSourceError, match="3 different sizes.*data.image_size"):
        write_imagefolder(str(root), tmp_path, decode_workers=2, decode_chunk=4)


@pytest.mark.parametrize(("kwargs", "field"), [({"decode_workers": 0}, "data.decode_workers"), ({"decode_chunk": 0}, "data.decode_chunk"), ({"test_fraction": 1.5}, "data.test_fraction")])
def test_bad_decode_settings_name_the_field(tmp_path, kwargs, field):
    root = tmp_path / "imgs"
    make_folder(root, per_class=2, corrupt=False)
    with pytest.raises(DataSourceError, match=field):
        write_imagefolder(str(root), tmp_path, image_size=8, **kwargs)


def test_config_validates_decode_settings():
    data = parse_params({}).data
    assert data.decode_workers == "auto" and data.decode_chunk == 128
    assert parse_params({"data": {"decode_workers": 3, "decode_chunk": 64}}).data.decode_workers == 3
    for bad, field in (({"decode_workers": 0}, "data.decode_workers"), ({"decode_workers": "all"}, "data.decode_workers"), ({"decode_chunk": 0}, "data.decode_chunk"), ({"decode_chunk": 10**6}, "data.decode_chunk")):
        with pytest.raises(ConfigError, match=field):
            parse_params({"data": bad}, source="params.yaml")
    # Not in the dump that names training runs: changing them re-runs nothing but prepare.
    assert "decode_workers" not in data.model_dump() and "decode_chunk" not in data.model_dump()


# --------------------------------------------------------------------------- npy rows, channel stats


def test_row_writer_equals_np_save_and_truncates(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (37, 5, 4, 3), dtype=np.uint8)
    with NpyRowWriter(tmp_path / "a.npy", capacity=100, row_shape=(5, 4, 3)) as writer:
        for start in range(0, 37, 8):
            writer.write(rows[start : start + 8])
    assert (tmp_path / "a.npy").read_bytes() == npy_bytes(rows)
    with NpyRowWriter(tmp_path / "empty.npy", capacity=10, row_shape=(2,), dtype=np.int64):
        pass
    assert (tmp_path / "empty.npy").read_bytes() == npy_bytes(np.empty((0, 2), np.int64))
    reader = NpyRows(tmp_path / "a.npy")
    assert reader.shape == rows.shape and len(reader) == 37
    np.testing.assert_array_equal(reader[3:11], rows[3:11])
    pick = np.array([0, 1, 2, 9, 20, 21, 36])
    np.testing.assert_array_equal(reader[pick], rows[pick])
    assert len(npy_header((1, 32, 32, 3))) == len(npy_header((10**12, 32, 32, 3)))  # rewritten in place


@pytest.mark.parametrize("shape", [(900, 32, 32, 3), (900, 24, 20, 1), (300, 7, 9, 1), (300, 5, 6, 3)])
@pytest.mark.parametrize("chunk_bytes", [1000, 1 << 14, 1 << 20])
def test_chunked_channel_stats_equal_the_one_shot_form_bit_for_bit(shape, chunk_bytes):
    rng = np.random.default_rng(sum(shape))
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    rows = np.sort(rng.choice(shape[0], shape[0] * 2 // 3, replace=False))
    expected = old_channel_stats(images[rows], max_images=500, seed=4)
    assert channel_stats(images, max_images=500, seed=4, rows=rows, chunk_bytes=chunk_bytes) == expected
    assert channel_stats(images[rows], max_images=500, seed=4, chunk_bytes=chunk_bytes) == expected


def test_channel_stats_read_from_disk(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (400, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    rows = list(range(0, 400, 3))
    assert channel_stats(NpyRows(tmp_path / "x.npy"), seed=2, rows=rows, chunk_bytes=1 << 15) == old_channel_stats(images[rows], seed=2)


# --------------------------------------------------------------------------- the prepare stage


def test_prepare_stage_output_equals_the_in_memory_path(tmp_path, monkeypatch, capsys):
    from lowlabel.stages import prepare as stage

    root = tmp_path / "imgs"
    make_folder(root, classes=tuple("abcdef"), per_class=10)
    params = parse_params(
        {
            "seed": 1,
            "data": {"source": "imagefolder", "root": str(root), "image_size": 12, "novel_classes": [4, 5], "labels_per_class": 2, "decode_workers": 2, "decode_chunk": 4},
        }
    )
    # The reference: everything in memory, written by write_prepared (the pre-streaming stage).
    ref, classes, skipped = reference_imagefolder(root, image_size=12, seed=1)
    split = make_split(ref["train_labels"], ref["test_labels"], [4, 5], 2, 1)
    mean, std = old_channel_stats(ref["train_images"][split.pretrain], seed=1)
    info = {"source": "imagefolder", "class_names": classes, "mean": mean, "std": std, "skipped": [list(s) for s in skipped]}
    write_prepared(tmp_path / "reference", ref["train_images"], ref["train_labels"], ref["test_images"], ref["test_labels"], split, info)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stage, "PROGRESS_EVERY_S", 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        summary = stage._prepare(params)
    prepared = tmp_path / "data" / "prepared"
    for name in ("split.json", "info.json", *(f"{a}.npy" for a in ARRAYS)):
        assert (prepared / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert prepared_digest(prepared) == prepared_digest(tmp_path / "reference")
    assert summary["skipped_images"] == 2 and summary["image_shape"] == [12, 12, 3]
    assert json.loads((prepared / "info.json").read_text())["skipped"] == [list(s) for s in skipped]
    out = capsys.readouterr().out
    assert "[prepare] decoded 62/62 images (100%)" in out and "images/s with 2 worker(s), 2 unreadable" in out
    assert not list((tmp_path / "data").glob(".prepared*"))  # the atomic temporary is gone
