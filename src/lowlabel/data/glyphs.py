"""Glyphs: an offline, Omniglot-like many-class benchmark rendered from Debian CJK fonts.

Each class is one Han character (CJK Unified Ideograph); each "writer" is one font family
(brush, handwriting, kai, ming/mincho, gothic/hei, ...), and every instance gets a mild
random affine / stroke-width jitter. Images are uint8, **white glyph on a black background**
(MNIST polarity; Omniglot's originals are the reverse), centred by the glyph's bounding box.

Nothing is downloaded: the fonts come from the Debian packages in
:data:`GLYPH_FONT_PACKAGES` (``apt-get install -y ...``). Glyphs a font lacks - rendered
blank, or as the font's missing-glyph box (.notdef / "tofu") - are detected and dropped:
the candidate characters are those every font really covers (fontTools' cmap plus a check
that the mapped outline is not empty: several of these fonts map thousands of codepoints
to empty glyphs), and each rendering is compared against the font's rendering of a
codepoint it does not map. fontTools is used when importable (it ships with matplotlib);
without it the render check alone decides, which is slower but gives the same kind of set.

Everything is a function of the arguments: fonts are sorted by path, characters are taken
in codepoint order, and each character's jitter comes from ``default_rng([seed, codepoint])``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

try:  # fontTools ships with matplotlib; used for cmap coverage, optional.
    from fontTools.ttLib import TTFont
except ImportError:  # pragma: no cover - exercised only where fontTools is absent
    TTFont = None

__all__ = [
    "GLYPH_FONT_FILES",
    "GLYPH_FONT_PACKAGES",
    "GlyphSet",
    "GlyphsError",
    "find_fonts",
    "missing_font_packages",
    "render_glyphs",
    "renders_glyph",
    "split_classes",
]

logger = logging.getLogger(__name__)

# Debian package -> the font files (face 0 of collections) that the benchmark uses from it.
# Each file is a visually distinct family (checked by rendering): near-duplicates that the
# packages also install (IPAPGothic, VL PGothic, kiloji - P, Konatu Tohaba, the other faces
# of the .ttc collections, SetoFont-ex) are left out, and fonts-komatuna is not used because
# its kanji are Konatu's. Installed size of the whole list: 218,951 KiB (~214 MiB, Debian 12).
GLYPH_FONT_FILES: dict[str, tuple[str, ...]] = {
    "fonts-aoyagi-kouzan-t": ("AoyagiKouzanT.ttf",),  # brush (JIS level 1 kanji only)
    "fonts-aoyagi-soseki": ("aoyagi-soseki.ttf",),  # brush, Natsume Soseki's hand
    "fonts-arphic-ukai": ("ukai.ttc",),  # kai (regular script, brush)
    "fonts-arphic-uming": ("uming.ttc",),  # ming
    "fonts-cwtex-fs": ("cwfs.ttf",),  # fangsong
    "fonts-cwtex-heib": ("cwheib.ttf",),  # bold hei
    "fonts-cwtex-kai": ("cwkai.ttf",),  # kai
    "fonts-cwtex-ming": ("cwming.ttf",),  # ming
    "fonts-cwtex-yen": ("cwyen.ttf",),  # yuan (rounded)
    "fonts-ipafont-gothic": ("ipag.ttf",),  # gothic
    "fonts-ipafont-mincho": ("ipam.ttf",),  # mincho
    "fonts-kiloji": ("kiloji.ttf", "kiloji_b.ttf", "kiloji_d.ttf"),  # handwriting, 3 hands
    "fonts-konatu": ("Konatu.ttf",),  # gothic
    "fonts-kouzan-mouhitsu": (  # brush: kaisho, gyosho (semi-cursive), sosho (cursive)
        "KouzanBrushFontSousyo.ttf",
        "kouzan-mouhitsu-gyosho.ttf",
        "kouzan-mouhitsu.ttf",
    ),
    "fonts-motoya-l-cedar": ("MTLc3m.ttf",),  # gothic
    "fonts-motoya-l-maruberi": ("MTLmr3m.ttf",),  # rounded gothic
    "fonts-seto": ("setofont.ttf",),  # handwriting
    "fonts-vlgothic": ("VL-Gothic-Regular.ttf",),  # gothic
    "fonts-wqy-microhei": ("wqy-microhei.ttc",),  # hei
    "fonts-wqy-zenhei": ("wqy-zenhei.ttc",),  # hei
}
GLYPH_FONT_PACKAGES: tuple[str, ...] = tuple(sorted(GLYPH_FONT_FILES))

FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
HAN_RANGE = (0x4E00, 0x9FFF)  # CJK Unified Ideographs (the basic block)
MIN_HAN_GLYPHS = 2000  # a font must really draw at least this many of them to be usable
# Codepoints no font here maps: their rendering is the font's .notdef glyph (first unmapped wins).
NOTDEF_PROBES = (0x10FFFD, 0x10FFFC, 0xFFFF, 0x0378)
# Common characters for the usability check without fontTools and for the duplicate check.
PROBE_CHARS = "一人大中日水山川口木手心生年見出書道永東愛飛魚風雲雨花夜"
DUPLICATE_SIMILARITY = 0.97  # probe renders this alike (mean cosine) = one family; distinct ones score <= 0.93
SCALE_TO_CANVAS = 3  # render at size * 3 (84 px for 28) and box-downsample
EM_FRACTION = 0.75  # font size as a fraction of the canvas; glyphs fill ~0.7 of it
MAX_GLYPH_FRACTION = 0.82  # bigger bounding boxes are scaled down to this
MIN_INK_FRACTION = 0.003  # fewer glyph pixels than this (of the canvas) = blank


class GlyphsError(ValueError):
    """The glyph set cannot be made; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class GlyphSet:
    images: np.ndarray  # uint8 (N, size, size, 1), white glyph on black
    labels: np.ndarray  # int64 (N,) class ids 0..C-1
    class_names: list[str]  # the character of each class, e.g. "U+4E00 一"
    fonts: list[str]  # the font file of each writer
    writer: np.ndarray  # int64 (N,) index into ``fonts`` of the font that rendered each image

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --------------------------------------------------------------------------------------
# fonts


def _install_hint(packages: Iterable[str] = GLYPH_FONT_PACKAGES) -> str:
    return "apt-get install -y " + " ".join(sorted(packages))


def _font_files(search_dirs: Sequence[str | os.PathLike]) -> list[Path]:
    files: set[Path] = set()
    for d in search_dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        for p in d.rglob("*"):
            if p.suffix.lower() in FONT_SUFFIXES:
                try:
                    r = p.resolve(strict=True)
                except OSError:
                    continue
                if r.is_file():
                    files.add(r)
    return sorted(files)


def missing_font_packages(search_dirs: Sequence[str | os.PathLike] = ("/usr/share/fonts",)) -> dict[str, list[str]]:
    """Package -> the benchmark's font files from it that are not under ``search_dirs``."""
    present = {p.name for p in _font_files(search_dirs)}
    missing = {pkg: [f for f in files if f not in present] for pkg, files in GLYPH_FONT_FILES.items()}
    return {pkg: files for pkg, files in missing.items() if files}


@functools.lru_cache(maxsize=256)
def _load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size, index=0, layout_engine=ImageFont.Layout.BASIC)


@functools.lru_cache(maxsize=128)
def _cmap_info(path: str) -> tuple[frozenset[int] | None, int]:
    """(the Han codepoints the font draws with a non-empty outline, a codepoint it does not map).

    ``None`` for the coverage when fontTools is unavailable or cannot read the font.
    """
    if TTFont is None:
        return None, NOTDEF_PROBES[0]
    ft_logger = logging.getLogger("fontTools")
    level = ft_logger.level
    ft_logger.setLevel(logging.ERROR)  # odd 'head' timestamps in several of these fonts
    try:
        font = TTFont(path, fontNumber=0, lazy=True)
        cmap = font.getBestCmap() or {}
        lo, hi = HAN_RANGE
        han = {c: name for c, name in cmap.items() if lo <= c <= hi}
        if "glyf" in font and "loca" in font:
            loca = font["loca"]
            order = font.getGlyphOrder()
            gid = {name: i for i, name in enumerate(order)}
            covered = frozenset(c for c, name in han.items() if loca[gid[name] + 1] > loca[gid[name]])
        else:  # CFF outlines: trust the cmap, the render check catches blanks
            covered = frozenset(han)
        probe = next((c for c in NOTDEF_PROBES if c not in cmap), NOTDEF_PROBES[0])
        font.close()
        return covered, probe
    except Exception as exc:  # unreadable by fontTools: leave it to the renderer
        logger.debug("fontTools cannot read %s: %s", path, exc)
        return None, NOTDEF_PROBES[0]
    finally:
        ft_logger.setLevel(level)


def _raw_mask(path: str, char: str, em: int) -> np.ndarray | None:
    """The glyph rendered at ``em`` px, cropped to its ink bounding box (uint8), or None if empty."""
    font = _load_font(path, em)
    side = 2 * em
    img = Image.new("L", (side, side), 0)
    ImageDraw.Draw(img).text((side // 2, side // 2), char, font=font, fill=255, anchor="mm")
    bbox = img.getbbox()
    if bbox is None:
        return None
    return np.asarray(img.crop(bbox))


@functools.lru_cache(maxsize=512)
def _notdef_mask(path: str, em: int) -> np.ndarray | None:
    return _raw_mask(path, chr(_cmap_info(path)[1]), em)


def _valid_mask(path: str, char: str, em: int) -> np.ndarray | None:
    """The cropped glyph, or None when it renders blank or as the font's missing-glyph box."""
    mask = _raw_mask(path, char, em)
    if mask is None or (mask > 127).sum() < MIN_INK_FRACTION * (em / EM_FRACTION) ** 2:
        return None
    notdef = _notdef_mask(path, em)
    if notdef is not None and notdef.shape == mask.shape and np.array_equal(notdef, mask):
        return None
    return mask


def renders_glyph(font: str | os.PathLike, char: str, em: int = 63) -> bool:
    """True when ``font`` draws ``char`` as a real glyph (not blank, not its .notdef box)."""
    return _valid_mask(str(font), char, em) is not None


def _probe_stack(path: str, em: int = 48, side: int = 24) -> list[np.ndarray | None]:
    """Unit-norm, zero-mean grayscale thumbnails of the probe characters (None where missing)."""
    out: list[np.ndarray | None] = []
    for ch in PROBE_CHARS:
        m = _valid_mask(path, ch, em)
        if m is None:
            out.append(None)
            continue
        a = np.asarray(Image.fromarray(m).resize((side, side), Image.BOX), dtype=np.float64)
        a -= a.mean()
        norm = np.linalg.norm(a)
        out.append(a / norm if norm > 0 else None)
    return out


def _same_family(a: list[np.ndarray | None], b: list[np.ndarray | None]) -> bool:
    sims = [float((x * y).sum()) for x, y in zip(a, b) if x is not None and y is not None]
    return len(sims) >= len(PROBE_CHARS) // 2 and float(np.mean(sims)) >= DUPLICATE_SIMILARITY


@functools.lru_cache(maxsize=16)
def _find_fonts_cached(search_dirs: tuple[str, ...], known_only: bool) -> tuple[Path, ...]:
    known = {f for files in GLYPH_FONT_FILES.values() for f in files}
    usable: list[Path] = []
    for path in _font_files(search_dirs):
        if known_only and path.name not in known:
            continue
        try:
            _load_font(str(path), 48)
        except OSError as exc:
            logger.warning("skipping unreadable font %s: %s", path, exc)
            continue
        covered, _ = _cmap_info(str(path))
        if covered is not None:
            if len(covered) < MIN_HAN_GLYPHS:
                continue
        elif sum(renders_glyph(path, ch) for ch in PROBE_CHARS) < len(PROBE_CHARS) - 2:
            continue
        usable.append(path)
    # One file per family: drop fonts whose glyphs duplicate an earlier (sorted) one's.
    kept: list[Path] = []
    stacks: list[list[np.ndarray | None]] = []
    for path in usable:
        stack = _probe_stack(str(path))
        if any(_same_family(stack, s) for s in stacks):
            logger.info("skipping %s: same glyphs as a font already kept", path)
            continue
        kept.append(path)
        stacks.append(stack)
    return tuple(kept)


def find_fonts(search_dirs: Sequence[str | os.PathLike] = ("/usr/share/fonts",), known_only: bool = True) -> list[Path]:
    """The usable Han font files under ``search_dirs``: one per family, sorted by path.

    With ``known_only`` (the default) only the benchmark's pinned files
    (:data:`GLYPH_FONT_FILES`) count, so extra fonts on a machine do not change the data;
    ``known_only=False`` takes any font that draws at least ``MIN_HAN_GLYPHS`` ideographs.
    Raises :class:`GlyphsError` naming the packages to install when none is usable.
    """
    dirs = tuple(str(Path(d)) for d in search_dirs)
    fonts = list(_find_fonts_cached(dirs, known_only))
    if not fonts:
        raise GlyphsError(
            f"no usable Han (CJK) fonts under {', '.join(dirs)}: the glyphs benchmark renders "
            f"characters from Debian font packages; install them with: {_install_hint()}"
        )
    return fonts


# --------------------------------------------------------------------------------------
# rendering


def _affine(rng_row: np.ndarray, canvas: int, pixel: float) -> tuple[float, ...]:
    """PIL AFFINE data (output -> input) for rotation, shear, scale, translation about the centre."""
    rot, scale, shear, tx, ty = rng_row
    c = canvas / 2.0
    th = math.radians(rot)
    rotm = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    fwd = rotm @ np.array([[1.0, math.tan(math.radians(shear))], [0.0, 1.0]]) * scale
    inv = np.linalg.inv(fwd)
    shift = np.array([c + tx * pixel, c + ty * pixel])
    offset = np.array([c, c]) - inv @ shift  # input = inv @ (out - shift) + centre
    return (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])


def _compose(mask: np.ndarray, size: int, params: np.ndarray | None) -> np.ndarray | None:
    """Centre the cropped glyph on the canvas, jitter it, downsample to ``size``; None if blank."""
    canvas = size * SCALE_TO_CANVAS
    glyph = Image.fromarray(mask)
    limit = MAX_GLYPH_FRACTION * canvas
    if max(glyph.size) > limit:
        f = limit / max(glyph.size)
        glyph = glyph.resize((max(1, round(glyph.width * f)), max(1, round(glyph.height * f))), Image.LANCZOS)
    img = Image.new("L", (canvas, canvas), 0)
    img.paste(glyph, ((canvas - glyph.width) // 2, (canvas - glyph.height) // 2))
    if params is not None:
        stroke = params[5]
        if stroke < 0.30:
            img = img.filter(ImageFilter.MaxFilter(3))  # bolder
        elif stroke > 0.80:
            thin = img.filter(ImageFilter.MinFilter(3))  # lighter, unless strokes would vanish
            ink = (np.asarray(img) > 127).sum()
            if (np.asarray(thin) > 127).sum() >= 0.6 * ink:
                img = thin
        pixel = SCALE_TO_CANVAS * size / 28.0  # translations are given in px at 28
        img = img.transform((canvas, canvas), Image.AFFINE, _affine(params[:5], canvas, pixel), resample=Image.BILINEAR)
    out = np.asarray(img.reduce(SCALE_TO_CANVAS))
    if out.max() < 128 or (out > 64).sum() < 3 or (out < 32).mean() < 0.3:
        return None
    return out


def _jitter_params(seed: int, codepoint: int, steps: int) -> np.ndarray:
    """(steps, 6): rotation deg, scale, shear deg, tx, ty (px at 28), stroke draw in [0,1)."""
    rng = np.random.default_rng([seed, codepoint])
    return np.stack(
        [
            rng.uniform(-10.0, 10.0, steps),
            rng.uniform(0.85, 1.05, steps),
            rng.uniform(-8.0, 8.0, steps),
            rng.uniform(-2.0, 2.0, steps),
            rng.uniform(-2.0, 2.0, steps),
            rng.uniform(0.0, 1.0, steps),
        ],
        axis=1,
    )


def _candidates(font_paths: list[str]) -> list[int]:
    covs = [_cmap_info(p)[0] for p in font_paths]
    known = [c for c in covs if c is not None]
    if not known:
        return list(range(HAN_RANGE[0], HAN_RANGE[1] + 1))
    return sorted(frozenset.intersection(*known))


def render_glyphs(
    num_classes: int = 1200,
    instances_per_class: int = 20,
    size: int = 28,
    seed: int = 0,
    fonts: list[Path] | None = None,
    jitter: bool = True,
    *,
    codepoints: Sequence[int] | None = None,
) -> GlyphSet:
    """Render ``num_classes`` characters x ``instances_per_class`` writers as a :class:`GlyphSet`.

    Characters are the Han ideographs every font draws, in codepoint order (U+4E00 on):
    the cmap coverage filter (fontTools) picks them and every font's render must pass the
    blank/.notdef check (without fontTools that check alone decides: same characters).
    Class ``k``'s instances rotate through the fonts starting at ``k * instances_per_class``,
    so all fonts are used evenly; within a class each font is used once when there are at
    least as many fonts as instances, else each repeats (with a different jitter). A font
    that renders the character blank or as its .notdef box is skipped; a character left
    with fewer than ``instances_per_class`` valid renders is dropped and the next one taken.

    ``codepoints`` replaces the candidate characters (in the given order) and bypasses the
    cmap coverage filter, so only the render checks decide, and a character is kept when
    enough fonts draw it (fonts that do not are skipped) - a hook for tests and for custom
    character lists. ``jitter=False`` gives the plain centred renders (then ``seed``
    has no effect). Raises :class:`GlyphsError` when fonts are missing or too few
    characters qualify.
    """
    if num_classes < 1 or instances_per_class < 1:
        raise GlyphsError(f"num_classes and instances_per_class must be >= 1, got {num_classes} and {instances_per_class}")
    if size < 8:
        raise GlyphsError(f"size must be >= 8 px, got {size}")
    if fonts is None:
        font_paths = find_fonts()
        missing = missing_font_packages()
        if missing:
            files = ", ".join(f for fs in missing.values() for f in fs)
            raise GlyphsError(
                f"the glyphs benchmark needs {len(GLYPH_FONT_PACKAGES)} font packages; missing font files: {files} "
                f"(packages: {' '.join(sorted(missing))}); install them with: {_install_hint(missing)} "
                "- or pass fonts=[...] explicitly (a different benchmark)"
            )
    else:
        font_paths = [Path(f) for f in fonts]
        absent = [str(f) for f in font_paths if not f.is_file()]
        if absent:
            raise GlyphsError(f"font files not found: {', '.join(absent)}; the benchmark's fonts come from: {_install_hint()}")
        if not font_paths:
            raise GlyphsError(f"fonts=[] gives no writers; install the fonts with: {_install_hint()}")
    paths = [str(p) for p in font_paths]
    n_fonts = len(paths)
    n = instances_per_class
    steps = math.ceil(n / n_fonts) * n_fonts  # each font at most ceil(n/F) times per class
    em = round(EM_FRACTION * size * SCALE_TO_CANVAS)

    if codepoints is None:
        cands = _candidates(paths)
        if len(cands) < num_classes:
            raise GlyphsError(
                f"only {len(cands)} characters are drawn by all {n_fonts} fonts, fewer than num_classes={num_classes}; "
                "ask for fewer classes or use fewer fonts"
            )
    else:
        cands = [int(c) for c in codepoints]
    require_all = codepoints is None

    images: list[np.ndarray] = []
    writers: list[int] = []
    class_names: list[str] = []
    n_dropped = 0
    for cp in cands:
        if len(class_names) == num_classes:
            break
        char = chr(cp)
        params = _jitter_params(seed, cp, steps) if jitter else None
        masks: dict[int, np.ndarray | None] = {}
        if require_all:  # default candidates: every font must draw it (as the cmap check says)
            masks = {w: _valid_mask(paths[w], char, em) for w in range(n_fonts)}
            if any(m is None for m in masks.values()):
                n_dropped += 1
                continue
        got_img: list[np.ndarray] = []
        got_w: list[int] = []
        for t in range(steps):
            w = (len(class_names) * n + t) % n_fonts  # rotation by kept-class index
            if w not in masks:
                masks[w] = _valid_mask(paths[w], char, em)
            if masks[w] is None:
                continue
            out = _compose(masks[w], size, None if params is None else params[t])
            if out is None:
                continue
            got_img.append(out)
            got_w.append(w)
            if len(got_img) == n:
                break
        if len(got_img) < n:
            n_dropped += 1
            continue
        images.extend(got_img)
        writers.extend(got_w)
        class_names.append(f"U+{cp:04X} {char}")
    if len(class_names) < num_classes:
        raise GlyphsError(
            f"only {len(class_names)} of {len(cands)} candidate characters have {n} valid renders "
            f"across {n_fonts} fonts ({n_dropped} dropped as blank/missing glyphs); num_classes={num_classes}"
        )
    if n_dropped:
        logger.info("glyphs: dropped %d characters with fewer than %d valid renders", n_dropped, n)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), n)
    return GlyphSet(
        images=np.stack(images)[..., None].astype(np.uint8, copy=False),
        labels=labels,
        class_names=class_names,
        fonts=paths,
        writer=np.asarray(writers, dtype=np.int64),
    )


def split_classes(num_classes: int, novel_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded (base, novel) split of class ids 0..num_classes-1: disjoint, covering, sorted.

    ``round(num_classes * novel_fraction)`` novel classes, but at least one of each kind when
    ``0 < novel_fraction < 1``.
    """
    if num_classes < 1:
        raise GlyphsError(f"num_classes must be >= 1, got {num_classes}")
    if not 0.0 <= novel_fraction <= 1.0:
        raise GlyphsError(f"novel_fraction must be in [0, 1], got {novel_fraction}")
    n_novel = round(num_classes * novel_fraction)
    if 0.0 < novel_fraction < 1.0 and num_classes >= 2:
        n_novel = min(max(n_novel, 1), num_classes - 1)
    perm = np.random.default_rng(seed).permutation(num_classes)
    novel = sorted(int(c) for c in perm[:n_novel])
    base = sorted(int(c) for c in perm[n_novel:])
    return base, novel
