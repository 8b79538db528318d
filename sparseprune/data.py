"""Small classification data for pruning experiments: scikit-learn's bundled digits, or your arrays.

Both entry points return a `DataSplit`, a named tuple `(x_train, y_train, x_test, y_test)`:
features are float32 torch tensors, labels int64 class indices (what `cross_entropy` takes).
The split is stratified (each class keeps its share in both halves) and depends only on `seed`.
Nothing is downloaded: `load_digits` ships inside scikit-learn.
"""
from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import numpy as np
import torch

# Pixel intensities of scikit-learn's 8x8 digits are integers 0..16.
DIGITS_MAX_PIXEL = 16.0


class DataSplit(NamedTuple):
    """Train and test halves; unpacks as `x_train, y_train, x_test, y_test = split`."""

    x_train: torch.Tensor  # float32 [n_train, ...]
    y_train: torch.Tensor  # int64 [n_train]
    x_test: torch.Tensor  # float32 [n_test, ...]
    y_test: torch.Tensor  # int64 [n_test]

    @property
    def n_features(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))

    @property
    def n_classes(self) -> int:
        return int(max(int(self.y_train.max()), int(self.y_test.max()))) + 1


def _as_numpy(value: Any, arg: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{arg} must be array-like, got {type(value).__name__}: {exc}") from None


def _check_seed(seed: object) -> int:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_test_fraction(test_fraction: object) -> float:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    value = float(test_fraction)
    if not 0.0 < value < 1.0:  # also rejects nan
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    return value


def _check_features(x: Any) -> np.ndarray:
    arr = _as_numpy(x, "x")
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise TypeError(f"x must hold numbers, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(f"x must have shape (n_samples, n_features, ...), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr[0].size == 0:
        raise ValueError(f"x must have at least one sample and one feature, got shape {arr.shape}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("x must be finite (it holds nan or inf)")
    return arr


def _check_labels(y: Any, n_samples: int) -> np.ndarray:
    arr = _as_numpy(y, "y")
    if arr.ndim != 1:
        raise ValueError(f"y must be 1-D (n_samples,), got shape {arr.shape}")
    if arr.shape[0] != n_samples:
        raise ValueError(f"y must have one label per row of x ({n_samples}), got {arr.shape[0]}")
    if np.issubdtype(arr.dtype, np.integer):
        labels = arr.astype(np.int64)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise ValueError("y must hold integer class indices, got non-integral values")
        labels = arr.astype(np.int64)
    else:
        raise TypeError(f"y must hold integer class indices, got dtype {arr.dtype}")
    if labels.min() < 0:
        raise ValueError(f"y must hold class indices >= 0, got {int(labels.min())}")
    return labels


def stratified_indices(y: np.ndarray, seed: int, test_fraction: float):
    """(train indices, test indices), both shuffled by `seed`.

    The test half gets round(test_fraction * n) samples, shared among the classes in proportion
    to their sizes (largest remainders get the leftover ones, ties to the lower label), except
    that every class with two or more samples keeps at least one on each side.
    """
    rng = np.random.default_rng(seed)
    labels, sizes = np.unique(y, return_counts=True)
    exact = test_fraction * sizes
    n_test = np.floor(exact).astype(np.int64)
    leftover = int(round(test_fraction * y.size)) - int(n_test.sum())
    if leftover > 0:
        order = np.argsort(-(exact - n_test), kind="stable")
        n_test[order[:leftover]] += 1
    n_test = np.where(sizes >= 2, np.clip(n_test, 1, sizes - 1), 0)  # a lone sample goes to train
    train, test = [], []
    for label, k in zip(labels, n_test):
        members = np.flatnonzero(y == label)
        members = members[rng.permutation(members.size)]
        test.append(members[:k])
        train.append(members[k:])
    train_idx = np.concatenate(train)
    test_idx = np.concatenate(test)
    if train_idx.size == 0 or test_idx.size == 0:
        raise ValueError(
            f"test_fraction={test_fraction} leaves an empty {'train' if train_idx.size == 0 else 'test'} "
            f"set for {y.size} samples"
        )
    return train_idx[rng.permutation(train_idx.size)], test_idx[rng.permutation(test_idx.size)]


def as_tensors(x: Any, y: Any):
    """Checked `(features float32 tensor, labels int64 tensor)` from array-like `x`, `y`, for data
    that is already split; raises ValueError/TypeError naming `x` or `y`."""
    features = _check_features(x)
    labels = _check_labels(y, features.shape[0])
    return torch.from_numpy(np.ascontiguousarray(features)), torch.from_numpy(labels)


def split_arrays(x: Any, y: Any, seed: int = 0, test_fraction: float = 0.25) -> DataSplit:
    """Split your own features `x` (n_samples, ...) and integer labels `y` (n_samples,).

    Accepts numpy arrays, torch tensors or nested lists. Features are converted to float32 as
    they are (scale them yourself); labels to int64. Raises ValueError/TypeError naming the
    argument (`x`, `y`, `seed`, `test_fraction`) that is wrong.
    """
    seed = _check_seed(seed)
    test_fraction = _check_test_fraction(test_fraction)
    features = _check_features(x)
    labels = _check_labels(y, features.shape[0])
    train_idx, test_idx = stratified_indices(labels, seed, test_fraction)
    return DataSplit(
        torch.from_numpy(np.ascontiguousarray(features[train_idx])),
        torch.from_numpy(labels[train_idx]),
        torch.from_numpy(np.ascontiguousarray(features[test_idx])),
        torch.from_numpy(labels[test_idx]),
    )


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> DataSplit:
    """scikit-learn's 1797 8x8 digits as 64 features scaled to [0, 1], split stratified by `seed`."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    seed = _check_seed(seed)
    test_fraction = _check_test_fraction(test_fraction)
    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float32) / np.float32(DIGITS_MAX_PIXEL)
    return split_arrays(x, np.asarray(digits.target), seed=seed, test_fraction=test_fraction)
