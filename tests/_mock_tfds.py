"""Toy-size, offline copies of the official tfds datasets of the paper's cluster configs: ``imagenet2012``,
``places365_small`` and ``cifar100``, prepared by the official builders into a ``data_dir`` that the official
builders then read (``tfds.builder(name, data_dir=...)``, ``tfds.data_source``), as on a cluster.

What is mocked, and what is the real code:

- The *source files* are fakes in the official formats, written here: ImageNet's manual-download tarballs
  (``ILSVRC2012_img_train.tar`` of per-synset tars of JPEGs, ``ILSVRC2012_img_val.tar``); Places365's
  ``train_256_places365standard.tar`` / ``val_256.tar`` / ``test_256.tar`` of JPEGs and the file lists of
  ``filelist_places365-standard.tar``; CIFAR-100's ``cifar-100-binary`` records (coarse label, fine label, 3072 bytes
  CHW) and label-name files. Small images whose colour depends on the class, so the tasks can be learnt.
- The *download layer* is replaced (:class:`OfflineDownloads`: URL -> local fake file, as tfds's own
  ``DatasetBuilderTestCase`` does with its dummy data), and the few lines of the official builders that reach
  TensorFlow only to touch files (``tf.io.gfile``) are replaced by plain-Python equivalents, because TensorFlow is
  not installed here (the ``cluster`` extra installs it where ``l3rs data prepare`` runs on real data):
  - ``imagenet2012``: ``_split_generators`` (``tf.io.gfile.exists``, the validation label lookup) is re-done; the
    official ``_generate_examples`` (nested synset tars, the JPEG fixes) runs.
  - ``places365_small``: the official ``_split_generators`` and ``_generate_examples`` run over the fakes.
  - ``cifar100``: the official ``_split_generators`` runs (label names from the files); ``_generate_examples`` is
    re-done, because the official one hands numpy images to ``tfds.features.Image``, whose PNG encoder is
    TensorFlow's: here the same binary records are parsed with numpy and PNG-encoded with Pillow.
- Everything else is the official code: each builder's ``DatasetInfo`` and features (``Image`` jpeg/png,
  ``ClassLabel`` with the real label names, ``Text``, ``supervised_keys``), version, split names, tfds's writer
  (array_record, shuffling), and the whole read path the workers use.

``prepare_all(data_dir)`` builds all three (~2 s) and returns the class ids of the toy class splits.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

IMAGENET, PLACES, CIFAR100 = "imagenet2012", "places365_small", "cifar100"

# Toy class splits: 4 pretrain classes, 3 meta-train and 3 meta-test classes (2-way tasks), the same counts on
# ImageNet and Places, so that their evaluation programs have the same shapes (one compile serves both).
N_PRETRAIN, N_META = 4, 3
TRAIN_PER_CLASS = 8  # train images per class
VAL_PER_META_CLASS = 2  # validation images per meta-train / meta-test class


@dataclasses.dataclass(frozen=True)
class ToyClasses:
    """The class ids (the dataset's own ClassLabel ids) of a toy split."""

    pretrain: tuple[int, ...]
    meta_train: tuple[int, ...]
    meta_test: tuple[int, ...]

    def config(self) -> dict[str, list[int]]:
        """``data.classes`` of a config."""
        return {"pretrain": list(self.pretrain), "meta_train": list(self.meta_train), "meta_test": list(self.meta_test)}


def _image(rng: np.random.Generator, label: int, height: int, width: int) -> np.ndarray:
    """A smooth image whose mean colour depends on the class (learnable), plus noise."""
    hue = (label * 0.618034) % 1.0
    base = 128 + 90 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
    ramp = np.linspace(-25, 25, width)[None, :, None] * (1 if label % 2 else -1)
    img = base[None, None, :] + ramp + rng.normal(0, 20, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _encoded(img: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _iter_tar(path: str) -> Iterator[tuple[str, Any]]:
    """``dl_manager.iter_archive`` without ``tf.io.gfile``: tfds's own tar iterator over a Python file object."""
    import tensorflow_datasets as tfds

    with open(path, "rb") as f:
        yield from tfds.download.iter_archive(f, tfds.download.ExtractMethod.TAR)


class OfflineDownloads:
    """The slice of ``tfds.download.DownloadManager`` the three builders use, served from local fake files."""

    def __init__(self, files: dict[str, str], manual_dir: str = "") -> None:
        self.files, self.manual_dir = files, manual_dir

    def _local(self, url: str) -> str:
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name not in self.files:
            raise AssertionError(f"the mock has no file for {url} (it never downloads)")
        return self.files[name]

    def download(self, urls: Any) -> Any:
        if isinstance(urls, dict):
            return {k: self._local(v) for k, v in urls.items()}
        return self._local(urls)

    download_and_extract = download

    def iter_archive(self, path: str) -> Iterator[tuple[str, Any]]:
        return _iter_tar(path)


# ---------------------------------------------------------------------------------------------------------------------
# The official builders, with only their TensorFlow file access replaced (see the module docstring).
# ---------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _unregistered() -> Iterator[None]:
    import tensorflow_datasets as tfds

    with tfds.core.registered.skip_registration():
        yield


def _builder_classes() -> dict[str, type]:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as imagenet
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
    from tensorflow_datasets.datasets.places365_small import places365_small_dataset_builder as places
    from tensorflow_datasets.image_classification import cifar

    with _unregistered():

        class Imagenet2012(imagenet.Builder):
            name = IMAGENET
            pkg_dir_path = imagenet.Builder._get_pkg_dir_path()  # the official metadata (README, citations)

            def _split_generators(self, dl_manager: Any) -> list[Any]:
                # The official method, with os.path / open instead of tf.io.gfile; its _generate_examples runs as is.
                train = os.path.join(dl_manager.manual_dir, "ILSVRC2012_img_train.tar")
                val = os.path.join(dl_manager.manual_dir, "ILSVRC2012_img_val.tar")
                labels = Path(os.fspath(tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME)))
                with tarfile.open(val) as tar:  # sorted image names <-> labels file, as the official lookup
                    names = sorted(tar.getnames())
                val_labels = dict(zip(names, labels.read_text().split(), strict=False))
                return [
                    tfds.core.SplitGenerator(name="train", gen_kwargs={"archive": dl_manager.iter_archive(train)}),
                    tfds.core.SplitGenerator(
                        name="validation",
                        gen_kwargs={"archive": dl_manager.iter_archive(val), "validation_labels": val_labels},
                    ),
                ]

        class Places365Small(places.Builder):
            name = PLACES
            pkg_dir_path = places.Builder._get_pkg_dir_path()

            def _split_generators(self, dl_manager: Any) -> Any:
                return super()._split_generators(dl_manager)  # the official one, over OfflineDownloads

        class Cifar100(cifar.Cifar100):
            name = CIFAR100
            pkg_dir_path = cifar.Cifar100._get_pkg_dir_path()

            def _generate_examples(self, split_prefix: str, filepaths: Any) -> Iterator[tuple[int, dict[str, Any]]]:
                # The official records (labels, then 3072 bytes CHW), PNG-encoded with Pillow instead of TensorFlow.
                index = 0
                for path in filepaths:
                    data = np.frombuffer(Path(path).read_bytes(), np.uint8).reshape(-1, 2 + 3072)
                    for row in data:
                        image = row[2:].reshape(3, 32, 32).transpose(1, 2, 0)
                        yield index, {"coarse_label": int(row[0]), "label": int(row[1]),
                                      "id": f"{split_prefix}{index:05d}", "image": _encoded(image, "PNG")}  # fmt: skip
                        index += 1

    return {IMAGENET: Imagenet2012, PLACES: Places365Small, CIFAR100: Cifar100}


# ---------------------------------------------------------------------------------------------------------------------
# Fake source files
# ---------------------------------------------------------------------------------------------------------------------
def _imagenet_sources(root: Path, rng: np.random.Generator) -> ToyClasses:
    """ILSVRC2012 tarballs: the first 100 validation images (their labels are the official file's first 100), and
    train images of the 10 toy classes: meta classes with two validation images each, pretrain classes with one."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    synsets = Path(os.fspath(imagenet_common.label_names_file())).read_text().split()
    val_labels = Path(os.fspath(tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME))).read_text().split()
    first = val_labels[:100]
    counts = {s: first.count(s) for s in dict.fromkeys(first)}
    twice = [s for s, c in counts.items() if c == VAL_PER_META_CLASS][: 2 * N_META]
    once = [s for s, c in counts.items() if c == 1][:N_PRETRAIN]
    assert len(twice) == 2 * N_META and len(once) == N_PRETRAIN
    manual = root / "manual"
    manual.mkdir(parents=True)
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
        for synset in once + twice:
            label = synsets.index(synset)
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                for i in range(TRAIN_PER_CLASS):  # ImageNet's sizes vary: the reader crops and resizes
                    img = _image(rng, label, 40 + 4 * (i % 3), 48)
                    _add(inner, f"{synset}_{i}.JPEG", _encoded(img, "JPEG"))
            _add(outer, f"{synset}.tar", inner_buf.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
        for i, synset in enumerate(first):
            _add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _encoded(_image(rng, synsets.index(synset), 44, 40), "JPEG"))
    ids = sorted(synsets.index(s) for s in once), [synsets.index(s) for s in twice]
    return ToyClasses(tuple(ids[0]), tuple(sorted(ids[1][:N_META])), tuple(sorted(ids[1][N_META:])))


def _places_sources(root: Path, rng: np.random.Generator) -> tuple[ToyClasses, dict[str, str]]:
    """Places365-standard tarballs (256x256 JPEGs, as the feature declares) and its file lists; the same class counts
    and validation counts as the ImageNet toy split."""
    classes = ToyClasses(tuple(range(N_PRETRAIN)), tuple(range(10, 10 + N_META)), tuple(range(20, 20 + N_META)))
    src = root / "places"
    lists = src / "filelist"
    lists.mkdir(parents=True)
    train_rows, val_rows = [], []
    with tarfile.open(src / "train_256_places365standard.tar", "w") as tar:
        for label in (*classes.pretrain, *classes.meta_train, *classes.meta_test):
            for i in range(TRAIN_PER_CLASS):
                key = f"/c/class{label}/{i + 1:08d}.jpg"
                _add(tar, f"data_256{key}", _encoded(_image(rng, label, 256, 256), "JPEG"))
                train_rows.append((key, label))
    with tarfile.open(src / "val_256.tar", "w") as tar:
        n = 0
        for label in (*classes.pretrain, *classes.meta_train, *classes.meta_test):
            for _ in range(1 if label in classes.pretrain else VAL_PER_META_CLASS):
                n += 1
                key = f"Places365_val_{n:08d}.jpg"
                _add(tar, f"val_256/{key}", _encoded(_image(rng, label, 256, 256), "JPEG"))
                val_rows.append((key, label))
    with tarfile.open(src / "test_256.tar", "w") as tar:
        for n in range(2):
            _add(tar, f"test_256/Places365_test_{n + 1:08d}.jpg", _encoded(_image(rng, 0, 256, 256), "JPEG"))
    for name, rows in (("places365_train_standard.txt", train_rows), ("places365_val.txt", val_rows),
                       ("places365_test.txt", [(f"Places365_test_{n + 1:08d}.jpg",) for n in range(2)])):  # fmt: skip
        with open(lists / name, "w", newline="") as f:
            csv.writer(f, delimiter=" ").writerows(rows)
    files = {
        "train_256_places365standard.tar": str(src / "train_256_places365standard.tar"),
        "val_256.tar": str(src / "val_256.tar"),
        "test_256.tar": str(src / "test_256.tar"),
        "filelist_places365-standard.tar": str(lists),  # download_and_extract: the extracted folder
    }
    return classes, files


def _cifar_sources(root: Path, rng: np.random.Generator) -> tuple[ToyClasses, dict[str, str]]:
    """cifar-100-binary: train.bin / test.bin records and the label-name files."""
    classes = ToyClasses(tuple(range(N_PRETRAIN)), tuple(range(50, 50 + N_META)), tuple(range(75, 75 + N_META)))
    folder = root / "cifar" / "cifar-100-binary"
    folder.mkdir(parents=True)
    (folder / "fine_label_names.txt").write_text("".join(f"fine{i}\n" for i in range(100)))
    (folder / "coarse_label_names.txt").write_text("".join(f"coarse{i}\n" for i in range(20)))
    # Twice the images: the config's validation batches are a slice of the train split ("train[75%:]" here).
    for name, per_class in (("train.bin", 2 * TRAIN_PER_CLASS), ("test.bin", VAL_PER_META_CLASS)):
        rows = []
        for label in (*classes.pretrain, *classes.meta_train, *classes.meta_test):
            for _ in range(per_class):
                img = _image(rng, label, 32, 32).transpose(2, 0, 1).reshape(-1)
                rows.append(np.concatenate([[label // 5, label], img]).astype(np.uint8))
        (folder / name).write_bytes(np.stack(rows).tobytes())
    return classes, {"cifar-100-binary.tar.gz": str(root / "cifar")}


def prepare_all(data_dir: str | os.PathLike, sources: str | os.PathLike) -> dict[str, ToyClasses]:
    """Writes the fake sources under ``sources`` and prepares the three datasets (array_record) under ``data_dir``
    with the official builders. Returns each dataset's toy class split."""
    import tensorflow_datasets as tfds

    root = Path(sources)
    rng = np.random.default_rng(0)
    classes = {IMAGENET: _imagenet_sources(root, rng)}
    classes[PLACES], places_files = _places_sources(root, rng)
    classes[CIFAR100], cifar_files = _cifar_sources(root, rng)
    downloads = {IMAGENET: OfflineDownloads({}, str(root / "manual")), PLACES: OfflineDownloads(places_files),
                 CIFAR100: OfflineDownloads(cifar_files)}  # fmt: skip
    for name, cls in _builder_classes().items():
        builder = cls(data_dir=os.fspath(data_dir), file_format="array_record")
        _prepare(builder, downloads[name], tfds)
    return classes


def _prepare(builder: Any, downloads: OfflineDownloads, tfds: Any) -> None:
    """``builder.download_and_prepare`` with ``downloads`` as its download manager."""
    original = builder._split_generators

    def split_generators(dl_manager: Any) -> Any:
        return original(downloads)

    builder._split_generators = split_generators
    config = tfds.download.DownloadConfig(manual_dir=downloads.manual_dir or None, compute_stats="skip")
    builder.download_and_prepare(download_config=config)
