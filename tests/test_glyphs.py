"""The glyphs dataset: a deterministic tfds build, the class filters, and the disjoint three-way class split."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest

from l3rs import data
from l3rs.data import glyphs

SPLITS = ("train", "validation", "test")


def _build(data_dir) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Prepares ``glyphs/small`` into ``data_dir`` and reads every split back through tfds's data source."""
    import tensorflow_datasets as tfds

    from l3rs.data import builders  # noqa: F401 - registers the builders

    builder = tfds.builder("glyphs/small", data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    builder = tfds.builder("glyphs/small", data_dir=str(data_dir), file_format="array_record")
    out = {}
    for split in SPLITS:
        source = builder.as_data_source(split=split)
        records = source.__getitems__(list(range(len(source))))
        out[split] = (np.stack([r["image"] for r in records]), np.asarray([r["label"] for r in records]))
    metadata = json.loads((builder.data_path / "metadata.json").read_text())
    return out, metadata


@pytest.fixture(scope="module")
def small_builds(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("glyphs_a")), _build(tmp_path_factory.mktemp("glyphs_b"))


def test_two_builds_into_fresh_dirs_are_identical(small_builds):
    (a, meta_a), (b, meta_b) = small_builds
    for split in SPLITS:
        np.testing.assert_array_equal(a[split][0], b[split][0])
        np.testing.assert_array_equal(a[split][1], b[split][1])
    assert meta_a == meta_b


def test_small_build_labels_counts_and_images(small_builds):
    (arrays, metadata), _ = small_builds
    settings = glyphs.GlyphsSettings(**metadata["settings"])
    assert settings.num_classes == 24 and len(metadata["classes"]) == 24
    for split in SPLITS:
        images, labels = arrays[split]
        assert images.shape[1:] == (28, 28, 1) and images.dtype == np.uint8
        assert labels.min() >= 0 and labels.max() < settings.num_classes
        assert np.bincount(labels, minlength=24).tolist() == [settings.per_class(split)] * 24
        # Non-trivial: every image has ink well above its noise, and no two images are the same.
        assert (images.reshape(len(images), -1).max(axis=1) > 150).all()
        assert (images.reshape(len(images), -1).mean(axis=1) > 5).all()
        assert len({img.tobytes() for img in images}) == len(images)
    # The class of each label is the one the metadata names: the build's images of label i are render_class's.
    classes = [glyphs.GlyphClass(c["code_point"], tuple(glyphs.FACES.index(f) for f in c["faces"]))
               for c in metadata["classes"]]  # fmt: skip
    for label in (0, 23):
        expected = glyphs.render_class(classes[label], settings)
        for split in SPLITS:
            images, labels = arrays[split]
            got = sorted(img.tobytes() for img in images[labels == label])
            assert got == sorted(img.tobytes() for img in expected[split])


def test_classes_pass_the_filters_they_claim(small_builds):
    settings = glyphs.GlyphsSettings(num_classes=30)
    classes = glyphs.select_classes(settings)
    points = [c.code_point for c in classes]
    assert points == sorted(set(points)) and len(points) == 30
    descriptors = []
    for c in classes:
        ch = chr(c.code_point)
        assert unicodedata.category(ch)[0] in "LNSP" and not unicodedata.decomposition(ch)
        assert not 0x2500 <= c.code_point <= 0x259F and not 0x2800 <= c.code_point <= 0x28FF
        assert len(c.faces) >= settings.min_faces
        assert all(glyphs._master(f, c.code_point) is not None for f in c.faces)
        descriptors.append(glyphs._descriptor(glyphs._master(0, c.code_point)))
    d = np.stack(descriptors)
    distance = 1.0 - np.minimum(d[:, None], d[None]).sum(-1) / np.maximum(d[:, None], d[None]).sum(-1)
    np.fill_diagonal(distance, 1.0)
    assert distance.min() >= settings.min_distance
    # A smaller draw (the small build's 24 classes) picks a subset of a larger one's classes.
    (_, metadata), _ = small_builds
    assert {c["code_point"] for c in metadata["classes"]} <= set(points)


def test_duplicates_and_blanks_are_dropped():
    # Greek capital alpha and Cyrillic capital a draw like Latin A; the space draws nothing. All are candidates.
    candidates, _ = glyphs._candidates(8)
    assert {ord("A"), 0x391, 0x410, ord("B")} <= set(candidates)
    assert glyphs.distinct_code_points([ord("A"), 0x391, 0x410, ord("B"), 0x20], 0.35) == [ord("A"), ord("B")]
    assert glyphs.distinct_code_points([0x410, ord("A")], 0.35) == [0x410]
    assert glyphs.distinct_code_points([ord("A"), 0x391], 0.0) == [ord("A"), 0x391]


def test_too_many_classes_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match="num_classes: only"):
        glyphs.select_classes(glyphs.GlyphsSettings(num_classes=10_000, min_faces=16))
    with pytest.raises(ValueError, match="train_per_class"):
        glyphs.GlyphsSettings(train_per_class=0)
    with pytest.raises(ValueError, match="min_faces"):
        glyphs.GlyphsSettings(min_faces=17)
    with pytest.raises(ValueError, match="min_distance"):
        glyphs.GlyphsSettings(min_distance=1.0)
    with pytest.raises(ValueError, match="image_size"):
        glyphs.GlyphsSettings(image_size=30)


def test_morphology_matches_pillows_rank_filters():
    from PIL import Image, ImageFilter

    master = np.rint(glyphs._master(1, ord("Q")) * 255).astype(np.uint8)
    for radius in (1, 2):
        ref = np.asarray(Image.fromarray(master).filter(ImageFilter.MaxFilter(2 * radius + 1)))
        np.testing.assert_array_equal(glyphs._morph(master, radius, np.maximum), ref)
    ref = np.asarray(Image.fromarray(master).filter(ImageFilter.MinFilter(3)))
    # Pillow's rank filter replicates the border; ours pads with 0: equal inside.
    np.testing.assert_array_equal(glyphs._morph(master, 1, np.minimum)[1:-1, 1:-1], ref[1:-1, 1:-1])


def test_glyphs_spec_splits_classes_three_ways_disjointly():
    spec = data.get_spec("glyphs")
    assert spec.offline and spec.num_classes == glyphs.NUM_CLASSES == 720 and spec.image_shape == (28, 28, 1)
    pre, train, test = map(set, (spec.pretrain_classes, spec.meta_train_classes, spec.meta_test_classes))
    assert (len(pre), len(train), len(test)) == (360, 180, 180)
    assert not pre & train and not pre & test and not train & test
    assert pre | train | test == set(range(720))
    assert (spec.train_split, spec.valid_split, spec.test_split) == ("train", "validation", "test")
    # The partition is a seeded shuffle, not contiguous blocks, and another seed gives another partition.
    assert spec.pretrain_classes != tuple(range(360))
    assert glyphs.class_partition(720, seed=1) != glyphs.class_partition(720, seed=0)
    with pytest.raises(ValueError, match="num_classes"):
        glyphs.class_partition(2)
    with pytest.raises(ValueError, match="fractions"):
        glyphs.class_partition(10, fractions=(0.9, 0.1))
