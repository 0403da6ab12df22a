"""Datasets: offline sources, local MNIST files, and a clear error when they are missing."""
from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from src.data.datamodule import ArrayDataModule
from src.data.datasets import DataFilesMissing, load_arrays


@pytest.mark.parametrize("name,opts,in_dim,classes", [
    ("digits", {}, 64, 10),
    ("moons", {"n_samples": 200, "noise": 0.1}, 2, 2),
    ("circles", {"n_samples": 200, "noise": 0.1, "factor": 0.5}, 2, 2),
])
def test_offline_sets(name, opts, in_dim, classes):
    dm = ArrayDataModule(name, batch_size=16, seed=0, val_fraction=0.25, **opts)
    assert dm.in_dim == in_dim and dm.n_classes == classes
    n_tr, n_va = len(dm.train_set), len(dm.val_set)
    assert n_va == pytest.approx(0.25 * (n_tr + n_va), abs=1)


def test_standardize_uses_training_statistics():
    x_tr, _, x_va, _ = load_arrays("digits", 0, val_fraction=0.2, standardize=True)
    assert np.abs(x_tr.mean(0)).max() < 1e-4
    assert np.abs(x_va.mean(0)).max() > 1e-3  # validation is transformed, not re-fitted
    assert np.abs(x_va).max() < 100  # features constant in training do not blow up in validation


def test_mnist_idx_files(tiny_mnist):
    dm = ArrayDataModule("mnist", batch_size=10, path=str(tiny_mnist))
    assert (len(dm.train_set), len(dm.val_set), dm.in_dim, dm.n_classes) == (200, 50, 784, 10)
    x, y = dm.train_set[:]
    assert 0.0 <= x.min() and x.max() <= 1.0 and y.max() == 9


def test_mnist_gzipped_idx_and_npz(tiny_mnist, tmp_path):
    gz = tmp_path / "gz"
    gz.mkdir()
    for f in tiny_mnist.iterdir():
        with open(f, "rb") as src, gzip.open(gz / f"{f.name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    a = load_arrays("fashion_mnist", 0, path=str(gz))
    assert a[0].shape == (200, 784)
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((5, 28, 28), np.uint8), y_train=np.arange(5),
             x_test=np.zeros((3, 28, 28), np.uint8), y_test=np.arange(3))
    assert load_arrays("mnist", 0, path=str(tmp_path))[2].shape == (3, 784)


def test_missing_files_error_names_the_path_and_the_cure(tmp_path):
    with pytest.raises(DataFilesMissing) as e:
        ArrayDataModule("mnist", batch_size=10, path=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert str((tmp_path / "nowhere").resolve()) in msg
    assert "train-images-idx3-ubyte" in msg and "data.path" in msg and "data=digits" in msg


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        ArrayDataModule("digits", batch_size=0)
