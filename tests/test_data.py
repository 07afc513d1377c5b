"""The data layer: offline tfds builders, class splits, slicing, normalisation."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from l3rs import data
from l3rs.data.builders import read_idx


def test_fashion_mnist_debian_splits_and_classes():
    train = data.load("fashion_mnist_debian", "train")
    valid = data.load("fashion_mnist_debian", "validation")
    test = data.load("fashion_mnist_debian", "test")
    assert (len(train.labels), len(valid.labels), len(test.labels)) == (50000, 10000, 10000)
    assert train.images.shape[1:] == (28, 28, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int32 and set(np.unique(train.labels)) == set(range(10))
    # Fashion-MNIST is balanced: 6000 per class over train + validation.
    counts = np.bincount(np.concatenate([train.labels, valid.labels]), minlength=10)
    assert counts.tolist() == [6000] * 10

    subset = data.load("fashion_mnist_debian", "test", classes=[5, 9])
    assert set(np.unique(subset.labels)) == {5, 9} and len(subset.labels) == 2000
    # The filtered split holds exactly the matching rows of the full split, in order.
    keep = np.isin(test.labels, [5, 9])
    np.testing.assert_array_equal(subset.images, test.images[keep])


def test_split_slicing_matches_numpy_slicing():
    full = data.load("sklearn_digits", "train")
    head = data.load("sklearn_digits", "train[:100]")
    tail = data.load("sklearn_digits", "train[50%:]")
    np.testing.assert_array_equal(head.images, full.images[:100])
    np.testing.assert_array_equal(tail.labels, full.labels[len(full.labels) // 2 :])
    with pytest.raises(ValueError, match="split"):
        data.load("sklearn_digits", "train[::2]")


def test_sklearn_digits_is_upscaled_uci_digits():
    from sklearn.datasets import load_digits

    splits = {s: data.load("sklearn_digits", s) for s in ("train", "validation", "test")}
    assert sum(len(s.labels) for s in splits.values()) == 1797
    img = splits["test"].images
    assert img.shape[1:] == (16, 16, 1)
    # Each 8x8 pixel became a 2x2 block.
    np.testing.assert_array_equal(img[:, ::2, ::2], img[:, 1::2, 1::2])
    # Same multiset of labels as scikit-learn's copy.
    ref = np.bincount(load_digits().target, minlength=10)
    got = np.bincount(np.concatenate([s.labels for s in splits.values()]), minlength=10)
    np.testing.assert_array_equal(got, ref)


def test_specs_keep_pretrain_and_task_classes_disjoint():
    for spec in data.SPECS.values():
        assert not set(spec.pretrain_classes) & set(spec.meta_train_classes), spec.name
        assert not set(spec.pretrain_classes) & set(spec.meta_test_classes), spec.name
        assert all(0 <= c < spec.num_classes for c in spec.meta_test_classes)
    imagenet = data.get_spec("imagenet2012")
    # Paper §5: 500 pretrain classes, the remaining 500 split into disjoint meta-train / meta-test halves.
    assert len(imagenet.pretrain_classes) == 500
    assert not set(imagenet.meta_train_classes) & set(imagenet.meta_test_classes)
    assert len(imagenet.meta_train_classes) + len(imagenet.meta_test_classes) == 500


def test_bad_names_and_classes_are_refused():
    with pytest.raises(ValueError, match="unknown dataset 'mnist_typo'"):
        data.get_spec("mnist_typo")
    with pytest.raises(ValueError, match="classes"):
        data.load("sklearn_digits", "train", classes=[3, 10])


def test_normalize_maps_uint8_to_unit_range():
    x = np.array([0, 255, 128], np.uint8)
    y = data.normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [-1.0, 1.0, 128 * 2 / 255 - 1], atol=1e-6)


def test_read_idx_roundtrip_and_truncation(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.asarray(arr.shape, ">u4").tobytes()
    good = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(good, "wb") as f:
        f.write(header + arr.tobytes())
    np.testing.assert_array_equal(read_idx(good), arr)
    bad = tmp_path / "y-idx3-ubyte"
    bad.write_bytes(header + arr.tobytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(bad)


def test_resize_for_datasets_of_another_size():
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = 255  # right half white
    out = data._resize(img, (8, 8, 1))
    assert out.shape == (8, 8, 1) and out.dtype == np.uint8
    assert out[:, :4].max() == 0 and out[:, 4:].min() == 255  # center crop keeps the left/right halves
