"""Data loaders: the fixed digits split, the CIFAR-10 batch format, and clear errors for bad paths."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from normkit.lab.data import DataError, load_cifar10, load_dataset, load_digits, write_cifar10_batches


def test_digits_split_is_fixed_stratified_and_standardised() -> None:
    ds = load_digits()
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    # stratified: every class in the test split, 34-37 samples each (1797 * 0.2 per class)
    counts = torch.bincount(ds.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    # train statistics: mean 0, std 1 (test is close but not exact)
    assert abs(float(ds.x_train.double().mean())) < 1e-6
    assert abs(float(ds.x_train.double().std()) - 1.0) < 1e-5
    again = load_digits()
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)


def test_digits16_upsamples() -> None:
    ds = load_dataset("digits16")
    assert ds.x_train.shape == (1437, 1, 16, 16) and ds.name == "digits16"


def test_limits() -> None:
    ds = load_dataset("digits", limit_train=10, limit_test=5)
    assert len(ds.x_train) == 10 and len(ds.y_test) == 5
    with pytest.raises(ValueError, match="limit_train"):
        load_dataset("digits", limit_train=0)


def test_cifar_loader_reads_generated_batches(tmp_path: Path) -> None:
    write_cifar10_batches(tmp_path, n_train=30, n_test=12, num_batches=3, seed=1)
    ds = load_dataset(f"cifar10:{tmp_path}")
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (12, 3, 32, 32)
    assert ds.in_channels == 3 and ds.num_classes == 10
    # per-channel standardisation with train statistics
    mean = ds.x_train.double().mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3, dtype=torch.float64), atol=1e-6)
    # the pixel layout: row i of 'data' holds R(1024) G(1024) B(1024), each row-major 32x32
    with open(tmp_path / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    first = torch.from_numpy(raw[b"data"][0].astype(np.float64)).reshape(3, 32, 32)
    x0 = ds.x_train[0].double()
    corr = torch.corrcoef(torch.stack([first[1].flatten(), x0[1].flatten()]))[0, 1]
    assert corr > 0.999
    assert ds.y_train[:10].tolist() == raw[b"labels"][:10]


def test_cifar_subfolder_and_str_keys(tmp_path: Path) -> None:
    sub = tmp_path / "cifar-10-batches-py"
    write_cifar10_batches(sub, n_train=4, n_test=2, num_batches=1)
    # a batch written with str keys (as a Python 3 re-dump might) is accepted too
    with open(sub / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    with open(sub / "test_batch", "wb") as f:
        pickle.dump({"data": raw[b"data"], "labels": raw[b"labels"]}, f)
    assert load_cifar10(tmp_path).x_test.shape == (2, 3, 32, 32)


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"cifar10:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="has no data_batch_\\* or test_batch"):
        load_dataset(f"cifar10:{tmp_path}")
    with pytest.raises(DataError, match="needs a path"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("mnist")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not a pickle", "not a CIFAR-10 python batch"),
        (pickle.dumps([1, 2, 3]), "expected a dict"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "no 'data' and 'labels'"),
        (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), "uint8 array of shape"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}), "integers in 0..9"),
    ],
)
def test_corrupt_batch_is_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    write_cifar10_batches(tmp_path, n_train=4, n_test=2, num_batches=1)
    (tmp_path / "data_batch_1").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_cifar10(tmp_path)


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    write_cifar10_batches(tmp_path, n_train=4, n_test=2, num_batches=1)

    class Evil:
        def __reduce__(self):  # would run os.system on a plain pickle.load
            import os

            return (os.system, ("echo pwned",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match="refusing to load"):
        load_cifar10(tmp_path)
