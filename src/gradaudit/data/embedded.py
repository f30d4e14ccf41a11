"""The dataset registry, helpers shared by all loaders, and the scikit-learn bundled datasets."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits

from gradaudit.data.base import Dataset
from gradaudit.registry import Registry
from gradaudit.types import Normalization, TabularSchema, TaskInfo

Loader = Callable[[Path | None], Dataset]
"""A dataset loader: the data dir (None means ``$GRADAUDIT_DATA_DIR``) to an in-memory Dataset."""

DATASETS: Registry[Loader] = Registry("dataset")
"""Every dataset, by name; each entry is a :data:`Loader`."""

SPLIT_SEED = 0
"""Seed of the ``np.random.default_rng`` that makes the fixed train/test splits (never changes)."""

TEST_FRACTION = 0.2
"""Share of each stratum held out for testing when a dataset ships without a test split."""

NORMALIZATION_DECIMALS = 4
"""Per-channel image mean/std are rounded to this many decimals (pixel units in [0, 1])."""


# --------------------------------------------------------------------------- shared helpers


def stratified_split(
    strata: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic stratified train/test split.

    Within each stratum (in sorted stratum order) the examples are permuted by one
    ``np.random.default_rng(seed)`` and the first ``round(test_fraction * size)`` are held out.

    Args:
        strata: one stratum id per example (e.g. the label, or ``site * num_classes + label``).
        test_fraction: the share of every stratum that goes to the test split.
        seed: the generator's seed; a constant, so the split never changes between runs.

    Returns:
        Sorted int64 indices of the training and of the test examples.
    """
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(strata), dtype=bool)
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        is_test[members[: int(np.floor(test_fraction * len(members) + 0.5))]] = True
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)


def fixed_permutation(n: int, seed: int = SPLIT_SEED) -> np.ndarray:
    """``np.random.default_rng(seed).permutation(n)``: depends only on `n` and `seed`."""
    return np.random.default_rng(seed).permutation(n).astype(np.int64)


def channel_normalization(pixels: np.ndarray) -> Normalization:
    """Per-channel mean/std of (N, C, H, W) pixels in [0, 1], rounded to 4 decimals."""
    axes = (0, *range(2, pixels.ndim))
    mean = pixels.mean(axis=axes, dtype=np.float64)
    std = pixels.std(axis=axes, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    return Normalization(
        mean=tuple(round(float(m), NORMALIZATION_DECIMALS) for m in mean),
        std=tuple(round(float(s), NORMALIZATION_DECIMALS) for s in std),
    )


def normalize_pixels(pixels: np.ndarray, norm: Normalization) -> np.ndarray:
    """(N, C, H, W) float pixels in [0, 1] to model space, as a new float32 array."""
    view = (1, -1) + (1,) * (pixels.ndim - 2)
    mean = np.asarray(norm.mean, dtype=np.float32).reshape(view)
    std = np.asarray(norm.std, dtype=np.float32).reshape(view)
    out = np.asarray(pixels, dtype=np.float32) - mean
    out /= std
    return out


def uint8_to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W) or (N, H, W, C) to float32 (N, C, H, W) in [0, 1]."""
    x = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    out = np.ascontiguousarray(x, dtype=np.float32)
    out /= 255.0
    return out


def image_dataset(
    name: str,
    pixels_train: np.ndarray,
    y_train: np.ndarray,
    pixels_test: np.ndarray,
    y_test: np.ndarray,
    class_names: Sequence[str],
) -> Dataset:
    """An image Dataset normalised with the training split's per-channel statistics.

    Args:
        name: the dataset's registry name.
        pixels_train: float (N, C, H, W) training pixels in [0, 1].
        y_train: integer training labels.
        pixels_test: float (M, C, H, W) test pixels in [0, 1].
        y_test: integer test labels.
        class_names: one name per label.
    """
    norm = channel_normalization(pixels_train)
    info = TaskInfo(
        dataset=name,
        modality="image",
        input_shape=tuple(int(d) for d in pixels_train.shape[1:]),
        num_classes=len(class_names),
        normalization=norm,
        class_names=tuple(class_names),
    )
    return Dataset(
        info=info,
        x_train=torch.from_numpy(normalize_pixels(pixels_train, norm)),
        y_train=torch.from_numpy(np.asarray(y_train, dtype=np.int64)),
        x_test=torch.from_numpy(normalize_pixels(pixels_test, norm)),
        y_test=torch.from_numpy(np.asarray(y_test, dtype=np.int64)),
    )


def impute_and_standardize(
    train: np.ndarray, test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], tuple[float, ...]]:
    """Fill NaNs with the train median, then standardise with the train mean/std, per column.

    A column that is all missing in train is imputed with 0; a constant column keeps std 1.

    Args:
        train: float (N, D) training columns, NaN where missing.
        test: float (M, D) test columns, NaN where missing.

    Returns:
        The standardised float32 train and test columns, and the per-column mean and std they
        were standardised with (for ``TabularSchema.numeric_mean`` / ``numeric_std``).
    """
    train = np.array(train, dtype=np.float64)
    test = np.array(test, dtype=np.float64)
    observed = ~np.isnan(train)
    medians = np.array(
        [np.median(c[ok]) if ok.any() else 0.0 for c, ok in zip(train.T, observed.T, strict=True)]
    )
    for values in (train, test):
        rows, cols = np.nonzero(np.isnan(values))
        values[rows, cols] = medians[cols]
    mean = train.mean(axis=0) if len(train) else np.zeros(train.shape[1])
    std = train.std(axis=0) if len(train) else np.ones(train.shape[1])
    std = np.where(std > 0, std, 1.0)
    return (
        ((train - mean) / std).astype(np.float32),
        ((test - mean) / std).astype(np.float32),
        tuple(float(m) for m in mean),
        tuple(float(d) for d in std),
    )


def tabular_dataset(
    name: str,
    parts: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    schema: TabularSchema,
    class_names: Sequence[str],
    *,
    groups_train: np.ndarray | None = None,
    group_names: Sequence[str] | None = None,
) -> Dataset:
    """A tabular Dataset from ready model-space rows.

    Args:
        name: the dataset's registry name.
        parts: ``(x_train, y_train, x_test, y_test)``; rows laid out as `schema` says.
        schema: the column schema.
        class_names: one name per label.
        groups_train: the site index of each training row, for datasets with natural sites.
        group_names: the name of each site.
    """
    x_train, y_train, x_test, y_test = parts
    info = TaskInfo(
        dataset=name,
        modality="tabular",
        input_shape=(schema.num_features,),
        num_classes=len(class_names),
        normalization=None,
        class_names=tuple(class_names),
        tabular=schema,
    )
    return Dataset(
        info=info,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
        y_train=torch.from_numpy(np.asarray(y_train, dtype=np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        y_test=torch.from_numpy(np.asarray(y_test, dtype=np.int64)),
        groups_train=None if groups_train is None else np.asarray(groups_train, dtype=np.int64),
        group_names=None if group_names is None else tuple(group_names),
    )


# --------------------------------------------------------------------------- embedded datasets


@DATASETS.register(
    "digits",
    summary="image (1, 8, 8), 10 classes (digits 0-9); scikit-learn's 8x8 handwritten digits, "
    "1797 images, stratified 80/20 split; embedded, needs no files",
)
def digits(data_dir: Path | None = None) -> Dataset:
    """scikit-learn's 8x8 digits: pixel = value / 16, stratified 80/20 split (seed SPLIT_SEED).

    Args:
        data_dir: ignored; the data ships with scikit-learn.
    """
    bunch = load_digits()
    pixels = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train, test = stratified_split(labels)
    return image_dataset(
        "digits",
        pixels[train],
        labels[train],
        pixels[test],
        labels[test],
        [str(d) for d in range(10)],
    )


@DATASETS.register(
    "breast_cancer",
    summary="tabular (30,), 2 classes (malignant, benign); scikit-learn's Wisconsin diagnostic "
    "breast cancer, 569 rows, 30 standardised numeric features, stratified 80/20 split; "
    "embedded, needs no files",
)
def breast_cancer(data_dir: Path | None = None) -> Dataset:
    """scikit-learn's breast cancer data, standardised with train statistics, stratified 80/20.

    Labels keep scikit-learn's coding: 0 = malignant, 1 = benign.

    Args:
        data_dir: ignored; the data ships with scikit-learn.
    """
    bunch = load_breast_cancer()
    features = np.asarray(bunch.data, dtype=np.float64)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train, test = stratified_split(labels)
    x_train, x_test, mean, std = impute_and_standardize(features[train], features[test])
    names = tuple(str(n) for n in bunch.feature_names)
    schema = TabularSchema(
        numeric=names, categorical=(), cardinalities=(), numeric_mean=mean, numeric_std=std
    )
    return tabular_dataset(
        "breast_cancer",
        (x_train, labels[train], x_test, labels[test]),
        schema,
        [str(n) for n in bunch.target_names],
    )
