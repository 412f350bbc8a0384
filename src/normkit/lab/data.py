"""Data for the lab: scikit-learn's digits (default, no download) and CIFAR-10 from its python-pickle batches.

Every loader returns a :class:`Dataset` of float32 tensors ``(N, C, H, W)``, standardised with
statistics of the *training* split only, and int64 labels.

* ``"digits"``: ``sklearn.datasets.load_digits`` (1,797 8x8 grey images, 10 classes), a fixed
  stratified split 1,437 train / 360 test (``random_state=0``), pixels scaled to [0, 1], then
  standardised with the train split's mean and std (docs/EXPERIMENTS.md). ``"digits16"``: the same,
  bilinearly upsampled to 16x16 (E4's random nets).
* ``"cifar10:PATH"``: the ``data_batch_*`` and ``test_batch`` files of the CIFAR-10 python
  version (``cifar-10-batches-py``) under PATH, standardised per channel.
* ``"synthetic"``: Gaussian-noise images with random labels (a fallback with no dependencies).

A missing or malformed path raises :class:`DataError` (a ``ValueError``) that names the file and
what was wrong; the command line turns it into a non-zero exit with that message.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DIGITS_MAX_SIZE",
    "DataError",
    "check_data_spec",
    "Dataset",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_synthetic",
    "write_cifar10_batches",
]

DIGITS_MAX_SIZE = (
    64  # 'digitsN' upsamples to N x N: 1,797 x 64 x 64 floats = 29 MB; beyond is no longer "small"
)
DIGITS_TEST_SIZE = 360  # docs/EXPERIMENTS.md: 1,437 train / 360 test
CIFAR_FIELDS = 3 * 32 * 32


class DataError(ValueError):
    """A data set could not be loaded: missing path, unreadable or malformed file, bad spec."""


@dataclass(frozen=True)
class Dataset:
    """A train/test split of images as tensors, standardised with train statistics.

    Attributes:
        name: the spec it was loaded from (``"digits"``, ``"cifar10:/data/cifar"``).
        x_train, x_test: float32 ``(N, C, H, W)``.
        y_train, y_test: int64 ``(N,)``.
        num_classes: number of classes.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        """C of the images."""
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images."""
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    def limit(self, train: int | None = None, test: int | None = None) -> Dataset:
        """The first ``train`` / ``test`` samples (``None``: all), for quick runs.

        Example:
            >>> ds = load_synthetic(n_train=50, n_test=20)
            >>> small = ds.limit(train=10, test=5)
            >>> len(small.x_train), len(small.x_test)
            (10, 5)
        """
        for name, n in (("limit_train", train), ("limit_test", test)):
            if n is not None and n < 1:
                raise ValueError(f"{name} must be a positive number of samples, got {n}")
        return Dataset(
            self.name,
            self.x_train[:train],
            self.y_train[:train],
            self.x_test[:test],
            self.y_test[:test],
            self.num_classes,
        )

    def describe(self) -> dict[str, Any]:
        """Sizes and shapes, for the run record.

        Example:
            >>> load_synthetic(n_train=8, n_test=4).describe()["train"]
            8
        """
        return {
            "name": self.name,
            "train": len(self.x_train),
            "test": len(self.x_test),
            "shape": list(self.x_train.shape[1:]),
            "classes": self.num_classes,
        }


def _standardise(x_train: Tensor, x_test: Tensor, per_channel: bool) -> tuple[Tensor, Tensor]:
    """Subtract the train mean and divide by the train std (per channel or one scalar)."""
    dims = (0, 2, 3) if per_channel else (0, 1, 2, 3)
    mean = x_train.double().mean(dim=dims, keepdim=True)
    std = x_train.double().std(dim=dims, keepdim=True).clamp_min(1e-12)
    return ((x_train - mean) / std).float(), ((x_test - mean) / std).float()


def load_digits(image_size: int = 8) -> Dataset:
    """scikit-learn's digits: stratified split 1,437 / 360 (seed 0), [0, 1] pixels standardised with train
    stats.

    Args:
        image_size: 8 (native) or larger (bilinear upsampling, e.g. 16 for E4).

    Example:
        >>> ds = load_digits()
        >>> ds.x_train.shape, ds.x_test.shape
        (torch.Size([1437, 1, 8, 8]), torch.Size([360, 1, 8, 8]))
        >>> round(float(ds.x_train.mean()), 6), round(float(ds.x_train.std()), 4)  # ok: doctest
        (0.0, 1.0)
    """
    try:
        from sklearn.datasets import load_digits as _load
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - the lab extra installs it
        raise DataError("the digits data set needs scikit-learn: pip install 'normkit[lab]'") from e
    bunch: Any = _load()  # (a Bunch; the stubs type the return_X_y tuple too)
    x = torch.as_tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # pixels 0..16 -> [0, 1]
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=DIGITS_TEST_SIZE, stratify=y.numpy(), random_state=0
    )
    x_train, x_test = x[torch.as_tensor(idx_train)], x[torch.as_tensor(idx_test)]
    if image_size != 8:
        if image_size < 8:
            raise DataError(f"digits: image_size must be >= 8, got {image_size}")
        up = torch.nn.functional.interpolate
        x_train = up(x_train, size=(image_size, image_size), mode="bilinear", align_corners=False)
        x_test = up(x_test, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x_train, x_test = _standardise(x_train, x_test, per_channel=False)
    name = "digits" if image_size == 8 else f"digits{image_size}"
    return Dataset(name, x_train, y[torch.as_tensor(idx_train)], x_test, y[torch.as_tensor(idx_test)], 10)


def load_synthetic(
    n_train: int = 1024,
    n_test: int = 256,
    image_size: int = 8,
    channels: int = 1,
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """Gaussian-noise images with random labels (nothing to learn; a fallback and for tests).

    Example:
        >>> load_synthetic(n_train=4, n_test=2, image_size=16).x_train.shape
        torch.Size([4, 1, 16, 16])
    """
    g = torch.Generator().manual_seed(seed)
    shape = (channels, image_size, image_size)
    x_train = torch.randn((n_train, *shape), generator=g)
    x_test = torch.randn((n_test, *shape), generator=g)
    y_train = torch.randint(0, num_classes, (n_train,), generator=g)
    y_test = torch.randint(0, num_classes, (n_test,), generator=g)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, num_classes)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR batch needs nothing else.

    A pickle can run arbitrary code on load; refusing every other global keeps a stray file
    from doing so.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how a protocol-2 pickle written by Python 3 stores an array's bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} (a CIFAR-10 batch holds only numpy arrays)"
        )


def _read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 python batch -> uint8 images ``(n, 3, 32, 32)`` and int64 labels ``(n,)``."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DataError(f"cifar10: cannot read {path}: {e.strerror or e}") from e
    except Exception as e:  # any unpickling failure means the file is not a CIFAR batch
        raise DataError(f"cifar10: {path} is not a CIFAR-10 python batch (unpickling failed: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(
            f"cifar10: {path} is not a CIFAR-10 python batch (expected a dict, got {type(obj).__name__})"
        )
    get = lambda key: obj.get(key.encode(), obj.get(key))  # noqa: E731 - bytes keys (python 2 pickles) or str keys
    data, labels = get("data"), get("labels")
    if data is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in obj)
        raise DataError(f"cifar10: {path} has no 'data' and 'labels' entries (found keys: {', '.join(keys)})")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != CIFAR_FIELDS or data.dtype != np.uint8:
        raise DataError(
            f"cifar10: {path}: 'data' must be a uint8 array of shape (n, {CIFAR_FIELDS}), "
            f"got {data.dtype} {tuple(data.shape)}"
        )
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"cifar10: {path}: 'labels' must be {data.shape[0]} integers in 0..9")
    x = torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32)  # rows are R(1024) G(1024) B(1024), row-major
    return x, torch.from_numpy(labels.astype(np.int64))


def load_cifar10(path: str | Path) -> Dataset:
    """CIFAR-10 from the python-pickle batches in ``path`` (or its ``cifar-10-batches-py`` subfolder).

    Reads every ``data_batch_*`` file (the official set has 1..5) for training and ``test_batch``
    for testing; pixels scaled to [0, 1], then standardised per channel with train statistics.

    Raises:
        DataError: the folder or a file is missing, unreadable or not in the CIFAR-10 format.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = write_cifar10_batches(d, n_train=20, n_test=10)
        ...     load_cifar10(d).x_train.shape
        torch.Size([20, 3, 32, 32])
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(
            f"cifar10: path {str(root)!r} does not exist (expected the cifar-10-batches-py folder)"
        )
    if not root.is_dir():
        raise DataError(f"cifar10: {str(root)!r} is not a folder (expected the cifar-10-batches-py folder)")
    if not (root / "test_batch").exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    train_files = sorted(root.glob("data_batch_*"))
    test_file = root / "test_batch"
    if not train_files or not test_file.exists():
        missing = [
            n for n, ok in (("data_batch_*", bool(train_files)), ("test_batch", test_file.exists())) if not ok
        ]
        raise DataError(
            f"cifar10: {str(root)!r} has no {' or '.join(missing)} file (CIFAR-10 python version)"
        )
    parts = [_read_cifar_batch(f) for f in train_files]
    x_train = torch.cat([p[0] for p in parts]).float() / 255.0
    y_train = torch.cat([p[1] for p in parts])
    xt, y_test = _read_cifar_batch(test_file)
    x_train, x_test = _standardise(x_train, xt.float() / 255.0, per_channel=True)
    return Dataset(f"cifar10:{path}", x_train, y_train, x_test, y_test, 10)


def write_cifar10_batches(
    path: str | Path, n_train: int = 100, n_test: int = 50, num_batches: int = 2, seed: int = 0
) -> list[Path]:
    """Write a tiny random data set in the CIFAR-10 python format (for tests and demos).

    Files ``data_batch_1..num_batches`` (``n_train`` images in all) and ``test_batch``, each a
    pickled dict with ``b"data"`` (uint8 ``(n, 3072)``) and ``b"labels"`` (a list of ints), as
    the official files hold. Returns the written paths.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    sizes = [n_train // num_batches + (1 if i < n_train % num_batches else 0) for i in range(num_batches)]
    written = []
    for name, n in [*((f"data_batch_{i + 1}", s) for i, s in enumerate(sizes)), ("test_batch", n_test)]:
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, size=(n, CIFAR_FIELDS), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
        }
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written.append(root / name)
    return written


def check_data_spec(spec: str) -> tuple[str, str]:
    """Check the form of a data spec without loading anything; returns ``(kind, argument)``.

    Raises:
        DataError: an unknown spec, or ``digitsN`` with N outside 8..64.

    Example:
        >>> check_data_spec("digits16"), check_data_spec("cifar10:/data")
        (('digits', '16'), ('cifar10', '/data'))
        >>> check_data_spec("digits100000")
        Traceback (most recent call last):
        ...
        normkit.lab.data.DataError: --data 'digits100000': the image size must be 8..64, got 100000
    """
    if not isinstance(spec, str):
        raise DataError(f"--data must be a string such as 'digits', got {type(spec).__name__}")
    kind, sep, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "digits" and not sep:
        return "digits", "8"
    if kind.startswith("digits") and kind[6:].isdigit() and not sep:
        size = int(kind[6:])
        if not 8 <= size <= DIGITS_MAX_SIZE:
            raise DataError(f"--data {spec!r}: the image size must be 8..{DIGITS_MAX_SIZE}, got {size}")
        return "digits", str(size)
    if kind == "cifar10":
        if not arg:
            raise DataError("cifar10 needs a path: --data cifar10:PATH (the cifar-10-batches-py folder)")
        return "cifar10", arg
    if kind == "synthetic" and not sep:
        return "synthetic", ""
    raise DataError(
        f"unknown data set {spec!r}; expected 'digits', 'digitsN' (N in 8..{DIGITS_MAX_SIZE}), "
        "'cifar10:PATH' or 'synthetic'"
    )


def load_dataset(
    spec: str = "digits", *, limit_train: int | None = None, limit_test: int | None = None
) -> Dataset:
    """Load a data set by spec: ``"digits"``, ``"digits16"``, ``"cifar10:PATH"`` or ``"synthetic"``.

    Args:
        spec: which data set.
        limit_train, limit_test: keep only the first samples of each split (quick runs).

    Raises:
        DataError: unknown spec, or a path that cannot be read.

    Example:
        >>> load_dataset("digits", limit_train=100).describe()
        {'name': 'digits', 'train': 100, 'test': 360, 'shape': [1, 8, 8], 'classes': 10}
    """
    kind, arg = check_data_spec(spec)
    if kind == "digits":
        ds = load_digits(int(arg))
    elif kind == "cifar10":
        ds = load_cifar10(arg)
    else:
        ds = load_synthetic()
    return ds if limit_train is None and limit_test is None else ds.limit(limit_train, limit_test)
