"""The glyphs benchmark: Han characters rendered from Debian fonts, tofu/blank renders dropped."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from lowlabel.data import glyphs as G
from lowlabel.data.glyphs import GlyphsError, find_fonts, render_glyphs, renders_glyph, split_classes

MISSING = G.missing_font_packages()
needs_fonts = pytest.mark.skipif(
    bool(MISSING),
    reason=f"glyph fonts not installed (missing packages: {' '.join(sorted(MISSING))}); "
    f"install with: apt-get install -y {' '.join(G.GLYPH_FONT_PACKAGES)}",
)

# Codepoints no font maps: one unassigned (Greek block gap), one private use in plane 16.
UNMAPPED = (0x0378, 0x10FFFB)


@pytest.fixture(scope="module")
def fonts() -> list[Path]:
    if MISSING:
        pytest.skip("glyph fonts not installed")
    return find_fonts()


@pytest.fixture(scope="module")
def small(fonts):
    start = time.perf_counter()
    g = render_glyphs(num_classes=50, instances_per_class=5, seed=0)
    return g, time.perf_counter() - start


@needs_fonts
def test_pinned_fonts_are_found_and_distinct(fonts):
    assert len(fonts) == sum(len(f) for f in G.GLYPH_FONT_FILES.values()) >= 10
    assert fonts == sorted(fonts)
    assert sorted(p.name for p in fonts) == sorted(f for fs in G.GLYPH_FONT_FILES.values() for f in fs)


@needs_fonts
def test_small_set_shapes_and_speed(small):
    g, seconds = small
    assert seconds < 10, f"50 x 5 took {seconds:.1f}s"
    assert g.images.shape == (250, 28, 28, 1) and g.images.dtype == np.uint8
    assert g.labels.dtype == np.int64 and g.writer.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(g.labels), np.full(50, 5))
    assert len(g.class_names) == 50 and g.class_names[0] == "U+4E00 一"
    assert g.writer.min() >= 0 and g.writer.max() < len(g.fonts)
    for c in range(50):  # 5 instances <= 24 fonts: 5 different writers per class
        assert len(set(g.writer[g.labels == c].tolist())) == 5


@needs_fonts
def test_no_blank_images(small):
    images = small[0].images[..., 0]
    fg = (images > 128).sum(axis=(1, 2))
    bg = (images < 32).mean(axis=(1, 2))
    assert fg.min() >= 3, "an image has (almost) no glyph pixels"
    assert bg.min() > 0.3, "an image has (almost) no background"


@needs_fonts
def test_classes_are_distinct_characters(small):
    names = small[0].class_names
    chars = [n.split(" ", 1)[1] for n in names]
    assert len(set(chars)) == len(chars) and all(len(c) == 1 for c in chars)
    assert all(0x4E00 <= ord(c) <= 0x9FFF for c in chars)
    assert [ord(c) for c in chars] == sorted(ord(c) for c in chars)


@needs_fonts
def test_deterministic_by_seed(small):
    g = small[0]
    again = render_glyphs(num_classes=50, instances_per_class=5, seed=0)
    np.testing.assert_array_equal(g.images, again.images)
    np.testing.assert_array_equal(g.labels, again.labels)
    np.testing.assert_array_equal(g.writer, again.writer)
    assert g.class_names == again.class_names and g.fonts == again.fonts
    other = render_glyphs(num_classes=50, instances_per_class=5, seed=1)
    assert other.class_names == g.class_names  # same characters and writers, other jitter
    assert not np.array_equal(other.images, g.images)
    plain = render_glyphs(num_classes=5, instances_per_class=3, jitter=False, seed=0)
    np.testing.assert_array_equal(plain.images, render_glyphs(num_classes=5, instances_per_class=3, jitter=False, seed=7).images)


@needs_fonts
def test_more_instances_than_fonts_repeats_fonts(fonts):
    n = len(fonts) + 3
    g = render_glyphs(num_classes=2, instances_per_class=n, seed=0)
    assert g.images.shape[0] == 2 * n
    w = g.writer[g.labels == 0]
    assert len(set(w.tolist())) == len(fonts)  # every font, 3 of them twice (different jitter)


@needs_fonts
def test_tofu_and_blank_renders_are_dropped(fonts):
    for cp in UNMAPPED:
        assert not any(renders_glyph(f, chr(cp)) for f in fonts), hex(cp)
    assert all(renders_glyph(f, "永") for f in fonts)
    # The .notdef box has ink in most of these fonts, so it is the comparison that rejects it.
    ipag = next(f for f in fonts if f.name == "ipag.ttf")
    assert G._raw_mask(str(ipag), chr(UNMAPPED[0]), 63) is not None
    # cwTeX Yen maps U+7CCE 糎 in its cmap, but to a copy of its .notdef box: only the render check sees it.
    cwyen = next(f for f in fonts if f.name == "cwyen.ttf")
    assert not renders_glyph(cwyen, "\u7cce")
    # Forced in through the hook (no cmap filter): the unmapped characters are dropped, the rest kept.
    g = render_glyphs(num_classes=3, instances_per_class=4, codepoints=[0x4E00, UNMAPPED[0], 0x4E01, UNMAPPED[1], 0x4E03])
    assert g.class_names == ["U+4E00 一", "U+4E01 丁", "U+4E03 七"]
    with pytest.raises(GlyphsError, match="only 1 of 3"):
        render_glyphs(num_classes=2, instances_per_class=4, codepoints=[UNMAPPED[0], 0x4E00, UNMAPPED[1]])


@needs_fonts
def test_mapped_but_empty_glyphs_are_blank(fonts):
    fontTools = pytest.importorskip("fontTools.ttLib")
    aoyagi = next(f for f in fonts if f.name == "AoyagiKouzanT.ttf")
    cmap = fontTools.TTFont(str(aoyagi), lazy=True).getBestCmap()
    covered = G._cmap_info(str(aoyagi))[0]
    empty = next(c for c in sorted(cmap) if 0x4E00 <= c <= 0x9FFF and c not in covered)
    assert not renders_glyph(aoyagi, chr(empty))


@needs_fonts
def test_too_many_classes_is_a_clear_error(fonts):
    with pytest.raises(GlyphsError, match=rf"only \d+ characters are drawn by all {len(fonts)} fonts"):
        render_glyphs(num_classes=100_000, instances_per_class=2)


def test_split_classes_disjoint_and_covering():
    base, novel = split_classes(100, 0.2, seed=3)
    assert len(novel) == 20 and len(base) == 80
    assert not set(base) & set(novel)
    assert sorted(base + novel) == list(range(100))
    assert (base, novel) == split_classes(100, 0.2, seed=3)
    assert novel != split_classes(100, 0.2, seed=4)[1]
    assert split_classes(5, 0.01, seed=0)[1] != []  # at least one novel class
    with pytest.raises(GlyphsError, match="novel_fraction"):
        split_classes(10, 1.5, seed=0)


def test_no_usable_fonts_is_a_clear_error(tmp_path):
    with pytest.raises(GlyphsError, match="apt-get install -y fonts-"):
        find_fonts([tmp_path])
    (tmp_path / "not-a-font.ttf").write_bytes(b"junk")
    with pytest.raises(GlyphsError, match="no usable Han"):
        find_fonts([tmp_path], known_only=False)
    with pytest.raises(GlyphsError, match="font files not found"):
        render_glyphs(num_classes=2, instances_per_class=2, fonts=[tmp_path / "missing.ttf"])


def _clear_caches():
    for fn in (G._cmap_info, G._notdef_mask, G._find_fonts_cached):
        fn.cache_clear()


@needs_fonts
def test_without_fonttools_same_data(small, monkeypatch):
    g = render_glyphs(num_classes=30, instances_per_class=5, seed=0)
    monkeypatch.setattr(G, "TTFont", None)
    _clear_caches()
    try:
        fallback = render_glyphs(num_classes=30, instances_per_class=5, seed=0)
    finally:
        monkeypatch.undo()
        _clear_caches()
    assert fallback.class_names == g.class_names
    np.testing.assert_array_equal(fallback.images, g.images)
    np.testing.assert_array_equal(fallback.writer, g.writer)
