"""Glyphs: an offline, Omniglot-like many-class image dataset rendered from the fonts that matplotlib ships.

One class is one Unicode character, drawn in up to 16 faces (DejaVu Sans, Sans Mono and Serif, each regular, bold,
oblique/italic and bold-oblique/bold-italic, and STIX General in the same four). The paper (§5) pretrains, meta-trains
and meta-tests on pairwise disjoint class sets; Fashion-MNIST's 10 classes cannot give that, a few hundred glyph
classes can (:func:`class_partition`).

How the classes are chosen (:func:`select_classes`), all deterministic:

1. candidates: code points that DejaVu Sans maps, whose Unicode category is a letter, number, symbol or punctuation,
   that have no Unicode decomposition (no accented or compatibility variants of another character), that are not
   box drawing, block elements or Braille patterns (cell-filling lines and dots), and that at least ``min_faces`` of
   the 16 faces map;
2. blanks and duplicates are dropped by looking at the bitmaps: the glyph is rendered in DejaVu Sans, cropped to its
   ink and fitted into a fixed box (so that only shape counts, as it does after the random affine), and a code point
   whose 16×16 bitmap is within ``min_distance`` (soft Jaccard distance, 1 - Σ min / Σ max) of an earlier one is
   dropped (Latin ``A`` / Greek ``Α`` / Cyrillic ``А``, ``o`` / ``O``, ``l`` / ``I``, ``∪`` / ``U``);
3. the survivors are visited in an order drawn with ``seed``; each is rendered in every face that maps it, faces
   whose rendering is empty are dropped, and a code point that keeps ``min_faces`` faces becomes a class, until
   there are ``num_classes`` (so a smaller ``num_classes`` picks a subset of a larger one's classes);
4. the classes are ordered by code point: label ``i`` is the ``i``-th.

Every image (:func:`render_class`) takes one of its class's faces at random and applies a random stroke width change
(dilation or erosion of the high-resolution master), a random affine map (rotation, per-axis scale, shear,
translation), box-filter downsampling to 28×28, a random contrast and Gaussian pixel noise. The random numbers of
class ``c``'s split ``s`` come from ``numpy.random.default_rng([seed, code point, s])``, so a class renders the same
whatever other classes are chosen. The same fonts, Pillow/FreeType and numpy give the same bytes; the fonts come with
matplotlib (recorded in the dataset's metadata with their versions).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "FACES",
    "GlyphClass",
    "GlyphsSettings",
    "NUM_CLASSES",
    "SPLIT_SEED",
    "class_partition",
    "distinct_code_points",
    "font_dir",
    "font_versions",
    "render",
    "render_class",
    "select_classes",
]

FACES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
)
"""The font files (in matplotlib's ``mpl-data/fonts/ttf``) a class may be drawn in; the first is the reference face."""

NUM_CLASSES = 720
"""Classes of the default ``glyphs`` dataset (what :data:`l3rs.data.SPECS` declares)."""

SPLIT_SEED = 0
"""Seed of the default pretrain / meta-train / meta-test class partition."""

_MASTER = 64  # side of the high-resolution master bitmap
_BOX = 44  # the glyph's ink is fitted into a _BOX x _BOX square of the master (≈ 19 px of the 28 px image)
_FONT_SIZE = 48
_DESCRIPTOR = 16  # side of the bitmap that duplicates are judged on
_SPLITS = ("train", "validation", "test")
# Box drawing, block elements and Braille: 416 cell-filling line and dot patterns, not characters.
_EXCLUDED_BLOCKS = ((0x2500, 0x259F), (0x2800, 0x28FF))


@dataclasses.dataclass(frozen=True)
class GlyphsSettings:
    """What a ``glyphs`` build is made of (stored in the dataset's metadata).

    Attributes:
      num_classes: classes drawn from the survivors of the filters (an error if fewer survive).
      train_per_class, validation_per_class, test_per_class: images per class in each split.
      min_faces: faces a code point must render in (non-empty) to become a class.
      min_distance: duplicates: soft Jaccard distance (1 - Σ min / Σ max over the pixels) of the normalised 16×16
        reference bitmaps below which a code point counts as a copy of an earlier one.
      seed: the class draw and every image's randomness.
      image_size: side of the square uint8 images (one channel).
    """

    num_classes: int = NUM_CLASSES
    train_per_class: int = 40
    validation_per_class: int = 20
    test_per_class: int = 20
    min_faces: int = 8
    min_distance: float = 0.35
    seed: int = 0
    image_size: int = 28

    def __post_init__(self) -> None:
        for field in ("num_classes", "train_per_class", "validation_per_class", "test_per_class", "min_faces"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"{field}: must be at least 1, got {getattr(self, field)}.")
        if self.min_faces > len(FACES):
            raise ValueError(f"min_faces: at most {len(FACES)} faces exist, got {self.min_faces}.")
        if not 0.0 <= self.min_distance < 1.0:
            raise ValueError(f"min_distance: must be in [0, 1), got {self.min_distance}.")
        if self.image_size < 8 or self.image_size % 4:
            raise ValueError(f"image_size: must be a multiple of 4 and at least 8, got {self.image_size}.")

    def per_class(self, split: str) -> int:
        """Images per class in ``split`` (``train``, ``validation`` or ``test``)."""
        return {"train": self.train_per_class, "validation": self.validation_per_class, "test": self.test_per_class}[
            split
        ]


@dataclasses.dataclass(frozen=True)
class GlyphClass:
    """One class: a code point and the faces (indices into :data:`FACES`) it renders in."""

    code_point: int
    faces: tuple[int, ...]

    @property
    def name(self) -> str:
        """``U+XXXX`` and the Unicode name, e.g. ``U+0041 LATIN CAPITAL LETTER A``."""
        return f"U+{self.code_point:04X} {unicodedata.name(chr(self.code_point), '')}".strip()


def class_partition(
    num_classes: int = NUM_CLASSES, seed: int = SPLIT_SEED, fractions: tuple[float, float] = (0.5, 0.25)
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Pretrain / meta-train / meta-test classes: a shuffled partition of ``range(num_classes)`` (paper §5).

    The first ``round(fractions[0] * n)`` classes of ``default_rng(seed).permutation(n)`` pretrain, the next
    ``round(fractions[1] * n)`` meta-train, the rest meta-test; each part is returned sorted. The three are pairwise
    disjoint and together cover every class.
    """
    if num_classes < 3:
        raise ValueError(f"num_classes: a three-way split needs at least 3 classes, got {num_classes}.")
    n_pre = int(round(fractions[0] * num_classes))
    n_train = int(round(fractions[1] * num_classes))
    if n_pre < 1 or n_train < 1 or n_pre + n_train >= num_classes:
        raise ValueError(f"fractions: {fractions} leave an empty part of {num_classes} classes.")
    order = np.random.default_rng(seed).permutation(num_classes)
    parts = order[:n_pre], order[n_pre : n_pre + n_train], order[n_pre + n_train :]
    return tuple(tuple(sorted(int(c) for c in p)) for p in parts)  # type: ignore[return-value]


def font_dir() -> str:
    """matplotlib's folder of TrueType fonts."""
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


@functools.cache
def _font(face: int) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(os.path.join(font_dir(), FACES[face]), _FONT_SIZE)


@functools.cache
def _cmaps() -> tuple[frozenset[int], ...]:
    """The code points each face maps (read once per process: the font files ship with matplotlib)."""
    from fontTools.ttLib import TTFont

    out = []
    for name in FACES:
        font = TTFont(os.path.join(font_dir(), name), lazy=True)
        out.append(frozenset(font.getBestCmap()))
        font.close()
    return tuple(out)


def font_versions() -> dict[str, str]:
    """Each face's version string (the font's ``name`` table entry 5), for the dataset's metadata."""
    from fontTools.ttLib import TTFont

    out = {}
    for name in FACES:
        font = TTFont(os.path.join(font_dir(), name), lazy=True)
        out[name] = str(font["name"].getDebugName(5))
        font.close()
    return out


def _master(face: int, code_point: int) -> np.ndarray | None:
    """The glyph cropped to its ink and fitted (aspect kept) into a centred _BOX square of a _MASTER canvas, as
    float32 in [0, 1]; None where the face draws nothing."""
    from PIL import Image, ImageDraw

    side = 2 * _FONT_SIZE
    canvas = Image.new("L", (side, side))
    ImageDraw.Draw(canvas).text((side // 2, side // 2), chr(code_point), fill=255, font=_font(face), anchor="mm")
    bbox = canvas.getbbox()
    if bbox is None:
        return None
    ink = canvas.crop(bbox)
    w, h = ink.size
    scale = _BOX / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    ink = ink.resize(size, Image.Resampling.LANCZOS)
    out = Image.new("L", (_MASTER, _MASTER))
    out.paste(ink, ((_MASTER - size[0]) // 2, (_MASTER - size[1]) // 2))
    arr = np.asarray(out, np.float32) / 255.0
    return arr if arr.max() > 0.25 else None


def _descriptor(master: np.ndarray) -> np.ndarray:
    k = _MASTER // _DESCRIPTOR
    return master.reshape(_DESCRIPTOR, k, _DESCRIPTOR, k).mean(axis=(1, 3)).ravel()


def _candidates(min_faces: int) -> tuple[list[int], tuple[frozenset[int], ...]]:
    cmaps = _cmaps()
    out = []
    for cp in sorted(cmaps[0]):
        ch = chr(cp)
        if unicodedata.category(ch)[0] not in "LNSP" or unicodedata.decomposition(ch):
            continue
        if any(lo <= cp <= hi for lo, hi in _EXCLUDED_BLOCKS):
            continue
        if sum(cp in cmap for cmap in cmaps) >= min_faces:
            out.append(cp)
    return out, cmaps


def distinct_code_points(code_points: Sequence[int], min_distance: float) -> list[int]:
    """The code points, in order, whose reference rendering (DejaVu Sans, cropped to its ink and fitted into a box,
    16×16) is non-empty and at soft Jaccard distance (1 - Σ min / Σ max) at least ``min_distance`` from every
    earlier kept one."""
    kept: list[int] = []
    descriptors = np.zeros((len(code_points), _DESCRIPTOR * _DESCRIPTOR), np.float32)
    for cp in code_points:
        master = _master(0, cp)
        if master is None:
            continue
        d = _descriptor(master)
        if kept:
            prev = descriptors[: len(kept)]
            similarity = np.minimum(prev, d).sum(axis=1) / np.maximum(prev, d).sum(axis=1)
            if 1.0 - float(similarity.max()) < min_distance:
                continue
        descriptors[len(kept)] = d
        kept.append(cp)
    return kept


def select_classes(settings: GlyphsSettings) -> list[GlyphClass]:
    """The dataset's classes, label order (see the module docstring for the filters).

    Raises:
      ValueError: fewer than ``settings.num_classes`` code points survive the filters.
    """
    candidates, cmaps = _candidates(settings.min_faces)
    kept = distinct_code_points(candidates, settings.min_distance)
    # Visit in a seeded order, keeping code points drawn non-empty by at least min_faces faces (only those faces
    # are the class's): a smaller num_classes gives a prefix of the same draw (before sorting by code point).
    chosen: list[GlyphClass] = []
    for i in np.random.default_rng(settings.seed).permutation(len(kept)):
        cp = kept[int(i)]
        faces = tuple(f for f in range(len(FACES)) if cp in cmaps[f] and _master(f, cp) is not None)
        if len(faces) >= settings.min_faces:
            chosen.append(GlyphClass(cp, faces))
            if len(chosen) == settings.num_classes:
                return sorted(chosen, key=lambda g: g.code_point)
    raise ValueError(
        f"num_classes: only {len(chosen)} glyph classes survive the filters (min_faces={settings.min_faces}, "
        f"min_distance={settings.min_distance}); asked for {settings.num_classes}."
    )


def _affine(u: Sequence[float], out_side: int) -> tuple[float, ...]:
    """PIL AFFINE coefficients (output pixel -> master pixel) of a random rotation, scale, shear and translation
    drawn from the uniforms ``u[0:6]``."""
    theta = math.radians(30.0 * u[0] - 15.0)  # rotation ±15°
    scale = 0.85 + 0.25 * u[1]  # 0.85 .. 1.10
    aspect = math.exp(0.2 * u[2] - 0.1)  # per-axis ±10 %
    shear = 0.4 * u[3] - 0.2  # x += shear * y
    k = out_side / _MASTER  # master -> output pixels at scale 1
    sx, sy = k * scale * aspect, k * scale / aspect
    c, s = math.cos(theta), math.sin(theta)
    # forward = R(theta) @ [[1, shear], [0, 1]] @ diag(sx, sy)
    a, b, d, e = c * sx, (c * shear - s) * sy, s * sx, (s * shear + c) * sy
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    shift = 2.5 / 28.0 * out_side  # ±2.5 px of a 28 px image
    ox = out_side / 2.0 + (2.0 * u[4] - 1.0) * shift
    oy = out_side / 2.0 + (2.0 * u[5] - 1.0) * shift
    half = _MASTER / 2.0
    return (ia, ib, half - ia * ox - ib * oy, id_, ie, half - id_ * ox - ie * oy)


def _morph(img: np.ndarray, radius: int, op: Any) -> np.ndarray:
    """Grey dilation (``op=np.maximum``) or erosion (``np.minimum``) with a (2r+1)² square, borders padded with 0."""
    h, w = img.shape
    padded = np.pad(img, radius)
    rows = padded[:, :w]
    for shift in range(1, 2 * radius + 1):
        rows = op(rows, padded[:, shift : shift + w])
    out = rows[:h]
    for shift in range(1, 2 * radius + 1):
        out = op(out, rows[shift : shift + h])
    return out


def _stroke_variants(master: np.ndarray) -> tuple[Any, ...]:
    """PIL images of the master with thinner strokes (eroded by 1 px where at least half the ink is left, else as
    drawn), as drawn, and dilated by 1 and 2 master pixels."""
    from PIL import Image

    thin = _morph(master, 1, np.minimum)
    if thin.sum() < 0.5 * master.sum():
        thin = master
    variants = (thin, master, _morph(master, 1, np.maximum), _morph(master, 2, np.maximum))
    return tuple(Image.fromarray(np.rint(v * 255.0).astype(np.uint8), "L") for v in variants)


def _image(variants: Sequence[Any], rng: np.random.Generator, size: int) -> np.ndarray:
    """One augmented image [size, size] uint8 from a face's stroke variants."""
    from PIL import Image

    u = rng.random(9).tolist()
    noise = rng.standard_normal((size, size))
    img = variants[min(int(u[6] * 4.0), 3)]  # stroke width
    # Affine at 2x the output size, then a 2x2 box filter (anti-aliasing).
    big = img.transform((2 * size, 2 * size), Image.Transform.AFFINE, _affine(u, 2 * size), Image.Resampling.BILINEAR)
    arr = np.asarray(big.reduce(2), np.float32)
    contrast = 0.7 + 0.3 * u[7]
    sigma = 20.0 * u[8]  # pixel noise, 0 .. 20 grey levels
    return np.clip(np.rint(arr * contrast + sigma * noise), 0, 255).astype(np.uint8)


def render_class(glyph: GlyphClass, settings: GlyphsSettings) -> dict[str, np.ndarray]:
    """The images of one class, per split: uint8 [n, size, size, 1] with n the split's images per class.

    Pure: a function of (code point, faces, settings). Split ``s`` draws from
    ``default_rng([seed, code point, index of s in (train, validation, test)])``; each image picks one of the
    class's faces and a stroke width uniformly, then a random affine map, contrast and noise (module docstring).
    """
    variants = {}
    for face in glyph.faces:
        m = _master(face, glyph.code_point)
        if m is None:
            raise ValueError(f"face {FACES[face]} draws nothing for U+{glyph.code_point:04X}.")
        variants[face] = _stroke_variants(m)
    out = {}
    for index, split in enumerate(_SPLITS):
        rng = np.random.default_rng([settings.seed, glyph.code_point, index])
        images = np.empty((settings.per_class(split), settings.image_size, settings.image_size, 1), np.uint8)
        for i in range(len(images)):
            face = glyph.faces[int(rng.integers(len(glyph.faces)))]
            images[i, ..., 0] = _image(variants[face], rng, settings.image_size)
        out[split] = images
    return out


def render(classes: Sequence[GlyphClass], settings: GlyphsSettings) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every split of the dataset in memory: ``{split: (images uint8 [N, size, size, 1], labels int64 [N])}``,
    class by class in label order (label ``i`` is ``classes[i]``)."""
    parts: dict[str, list[np.ndarray]] = {split: [] for split in _SPLITS}
    for glyph in classes:
        for split, images in render_class(glyph, settings).items():
            parts[split].append(images)
    return {
        split: (
            np.concatenate(parts[split]),
            np.repeat(np.arange(len(classes), dtype=np.int64), settings.per_class(split)),
        )
        for split in _SPLITS
    }
