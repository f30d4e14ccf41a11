"""Datasets (in model space, with public task facts) and how they are split among clients."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from gradaudit.data import files as _files  # noqa: F401  (registers the file-backed datasets)
from gradaudit.data import multimodal as _multimodal  # noqa: F401  (registers note+fields)
from gradaudit.data import text as _text  # noqa: F401  (registers the text datasets)
from gradaudit.data.base import DATA_DIR_ENV, Dataset, require_file, resolve_data_dir
from gradaudit.data.embedded import DATASETS, Loader
from gradaudit.data.partition import (
    PARTITIONERS,
    DirichletParams,
    IidParams,
    NaturalParams,
    PathologicalParams,
    partition_dataset,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "PARTITIONERS",
    "Dataset",
    "DirichletParams",
    "IidParams",
    "Loader",
    "NaturalParams",
    "PathologicalParams",
    "load_dataset",
    "partition_dataset",
    "require_file",
    "resolve_data_dir",
    "subsample",
]


def load_dataset(name: str, data_dir: Path | None = None) -> Dataset:
    """Load the dataset registered as `name`.

    Args:
        name: the dataset's registry name (``data.dataset``).
        data_dir: where its files are; None means ``$GRADAUDIT_DATA_DIR``.

    Raises:
        UnknownComponentError: `name` is not registered (lists the known names).
        DataError: a file is missing or malformed.
    """
    dataset = DATASETS.get(name)(data_dir)
    logger.info(
        "loaded dataset %s: %d train / %d test examples of shape %s",
        name,
        len(dataset.y_train),
        len(dataset.y_test),
        dataset.info.input_shape,
    )
    return dataset


def _subset_indices(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted random indices of `limit` of `n` examples, or None to keep all of them."""
    if limit is None or limit >= n:
        return None
    if limit < 1:
        raise ValueError(f"a subsample needs at least one example (got {limit})")
    return np.sort(rng.choice(n, size=limit, replace=False)).astype(np.int64)


def subsample(
    dataset: Dataset,
    *,
    max_train: int | None,
    max_test: int | None,
    rng: np.random.Generator,
) -> Dataset:
    """A random subset of at most `max_train` training and `max_test` test examples.

    The kept examples stay in their original relative order; ``groups_train`` stays aligned with
    the training examples. A limit of None (or one no smaller than the split) keeps that split.

    Args:
        dataset: the full dataset.
        max_train: the most training examples to keep, or None.
        max_test: the most test examples to keep, or None.
        rng: the subsampling stream (the training subset is drawn first, then the test subset).
    """
    train = _subset_indices(len(dataset.y_train), max_train, rng)
    test = _subset_indices(len(dataset.y_test), max_test, rng)
    changes: dict[str, object] = {}
    if train is not None:
        index = torch.from_numpy(train)
        changes["x_train"] = dataset.x_train[index]
        changes["y_train"] = dataset.y_train[index]
        if dataset.groups_train is not None:
            changes["groups_train"] = dataset.groups_train[train]
    if test is not None:
        index = torch.from_numpy(test)
        changes["x_test"] = dataset.x_test[index]
        changes["y_test"] = dataset.y_test[index]
    return dataclasses.replace(dataset, **changes) if changes else dataset
