"""tfds builders for the offline datasets: Fashion-MNIST from Debian's package, scikit-learn's digits, and glyphs
rendered from matplotlib's fonts.

All write ``array_record`` files and store images as ``tfds.features.Tensor(uint8)``, so they build and read back
without TensorFlow (``tfds.features.Image`` would need it to encode). Importing this module registers them with tfds
as ``fashion_mnist_debian``, ``sklearn_digits`` and ``glyphs``.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import platform
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from l3rs.data import glyphs

__all__ = ["FashionMnistDebian", "Glyphs", "GlyphsConfig", "SklearnDigits", "FASHION_MNIST_DIR_ENV", "read_idx"]

FASHION_MNIST_DIR_ENV = "L3RS_FASHION_MNIST_DIR"
"""Environment variable naming the folder of the four Fashion-MNIST IDX files (default: Debian's install path)."""

_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads a (gzipped) IDX file: the format of MNIST and Fashion-MNIST (big-endian dims, then the raw data)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file.")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated ({data.size} bytes of data for dims {dims.tolist()}).")
    return data.reshape(tuple(dims))


def _image_info(
    builder: tfds.core.GeneratorBasedBuilder, description: str, shape: tuple[int, int, int], homepage: str
) -> tfds.core.DatasetInfo:
    """10-class uint8 images stored as ``Tensor`` (``tfds.features.Image`` would need TensorFlow to encode)."""
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=shape, dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
        ),
        supervised_keys=("image", "label"),
        homepage=homepage,
    )


class FashionMnistDebian(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (Xiao et al. 2017) built from local IDX files, e.g. Debian's ``dataset-fashion-mnist``.

    Same images and labels as tfds's ``fashion_mnist``, whose checksums reject Debian's re-gzipped files. Splits:
    ``train`` (the first 50,000 training images), ``validation`` (the last 10,000) and ``test`` (10,000).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Fashion-MNIST from local IDX files; train/validation split of the official train set."}

    def _info(self) -> tfds.core.DatasetInfo:
        return _image_info(
            self,
            "Fashion-MNIST from local IDX files (Debian's dataset-fashion-mnist).",
            (28, 28, 1),
            "https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager):  # noqa: ANN001 - tfds's signature
        del dl_manager  # nothing to download
        folder = Path(os.environ.get(FASHION_MNIST_DIR_ENV, _DEBIAN_DIR))

        def find(stem: str) -> Path:
            for name in (f"{stem}.gz", stem):
                if (folder / name).exists():
                    return folder / name
            raise FileNotFoundError(
                f"fashion_mnist_debian: {folder / stem}(.gz) not found. Install Debian's dataset-fashion-mnist "
                f"(scripts/install_data.sh), point {FASHION_MNIST_DIR_ENV} at the IDX files, or use the official "
                f"tfds dataset 'fashion_mnist' on a machine with internet."
            )

        train_x, train_y = (
            read_idx(find("train-images-idx3-ubyte")),
            read_idx(find("train-labels-idx1-ubyte")),
        )
        test_x, test_y = read_idx(find("t10k-images-idx3-ubyte")), read_idx(find("t10k-labels-idx1-ubyte"))
        return {
            "train": self._generate_examples(train_x[:50000], train_y[:50000], 0),
            "validation": self._generate_examples(train_x[50000:], train_y[50000:], 50000),
            "test": self._generate_examples(test_x, test_y, 0),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, offset: int):  # noqa: ANN202
        for i, (x, y) in enumerate(zip(images, labels, strict=True)):
            yield offset + i, {"image": x[..., None], "label": int(y)}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """The UCI optical-digits images that scikit-learn ships (1,797 images of 8x8, 10 classes), upscaled to 16x16.

    Pixel values 0..16 are scaled to 0..255. Splits, fixed by index: ``test`` = every 5th image, ``validation`` = the
    one after it, ``train`` = the rest (1,078 / 359 / 360 images).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "scikit-learn's load_digits, 16x16 uint8, index-based splits."}

    def _info(self) -> tfds.core.DatasetInfo:
        return _image_info(
            self,
            "scikit-learn's optical-digits images (8x8, upscaled to 16x16 by pixel repetition).",
            (16, 16, 1),
            "https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
        )

    def _split_generators(self, dl_manager):  # noqa: ANN001 - tfds's signature
        del dl_manager
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        images = images.repeat(2, axis=1).repeat(2, axis=2)[..., None]
        labels = digits.target.astype(np.int64)
        index = np.arange(len(labels))
        parts = {"test": index % 5 == 0, "validation": index % 5 == 1, "train": index % 5 >= 2}
        return {name: self._generate_examples(images, labels, index[mask]) for name, mask in parts.items()}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, index: np.ndarray):  # noqa: ANN202
        for i in index:
            yield int(i), {"image": images[i], "label": int(labels[i])}


@dataclasses.dataclass(eq=False)
class GlyphsConfig(tfds.core.BuilderConfig):
    """A ``glyphs`` configuration: the :class:`l3rs.data.glyphs.GlyphsSettings` it renders."""

    settings: glyphs.GlyphsSettings = dataclasses.field(default_factory=glyphs.GlyphsSettings)


class Glyphs(tfds.core.GeneratorBasedBuilder):
    """Omniglot-like glyph classes rendered from the fonts matplotlib ships (:mod:`l3rs.data.glyphs`), offline.

    Configs: ``default`` (``glyphs``: 720 classes of 28×28×1 uint8; 40 / 20 / 20 images per class in ``train`` /
    ``validation`` / ``test``) and ``small`` (``glyphs/small``: 24 of the same classes, 6 / 3 / 3 images each, for
    tests and smoke runs). Labels are class indices in code-point order; ``info.metadata`` records the settings
    (seed included), the classes' code points, names and faces, the font files' versions and the renderer's.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Glyphs from matplotlib's DejaVu and STIX fonts, rendered with Pillow."}
    BUILDER_CONFIGS = [
        GlyphsConfig(name="default", description="720 classes, 40/20/20 images per class."),
        GlyphsConfig(
            name="small",
            description="24 classes, 6/3/3 images per class (tests, smoke runs).",
            settings=glyphs.GlyphsSettings(num_classes=24, train_per_class=6, validation_per_class=3, test_per_class=3),
        ),
    ]

    @property
    def settings(self) -> glyphs.GlyphsSettings:
        """The settings of this builder's config."""
        return self.builder_config.settings

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.settings.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Omniglot-like classes: one Unicode character drawn in several of matplotlib's DejaVu and STIX faces, "
                "each image with a random stroke width, affine map, contrast and noise (deterministic from a seed)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=self.settings.num_classes),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://dejavu-fonts.github.io/",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):  # noqa: ANN001 - tfds's signature
        del dl_manager  # nothing to download
        import PIL
        from PIL import features

        classes = glyphs.select_classes(self.settings)
        self.info.metadata.update(
            {
                "settings": dataclasses.asdict(self.settings),
                "classes": [
                    {
                        "label": i,
                        "code_point": c.code_point,
                        "name": c.name,
                        "faces": [glyphs.FACES[f] for f in c.faces],
                    }
                    for i, c in enumerate(classes)
                ],
                "fonts": glyphs.font_versions(),
                "renderer": {
                    "pillow": PIL.__version__,
                    "freetype2": str(features.version("freetype2")),
                    "numpy": np.__version__,
                    "python": platform.python_version(),
                },
            }
        )
        arrays = glyphs.render(classes, self.settings)
        return {split: self._generate_examples(*arrays[split]) for split in ("train", "validation", "test")}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):  # noqa: ANN202
        for i, (x, y) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": x, "label": int(y)}
