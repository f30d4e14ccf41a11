"""The in-memory dataset every loader returns, and where loaders look for files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from gradaudit.errors import DataError
from gradaudit.types import TaskInfo

DATA_DIR_ENV = "GRADAUDIT_DATA_DIR"


@dataclass(frozen=True)
class Dataset:
    """A dataset ready for federated training, already in model space.

    Attributes:
        info: public facts about the task (shape, classes, normalisation, tabular schema).
        x_train: float32 inputs, (N, *info.input_shape), normalised as the model consumes them.
        y_train: int64 labels in [0, info.num_classes).
        x_test: float32 held-out inputs, same layout.
        y_test: int64 held-out labels.
        groups_train: for datasets with natural sites, the site index of each training example.
        group_names: the name of each site.
    """

    info: TaskInfo
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    groups_train: np.ndarray | None = None
    group_names: tuple[str, ...] | None = None


def resolve_data_dir(data_dir: Path | str | None) -> tuple[Path | None, str]:
    """The data dir to read from and where that choice came from (for error messages)."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "the scenario's data.data_dir or --data-dir"
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser(), f"${DATA_DIR_ENV}"
    return None, "nowhere"


def require_file(data_dir: Path | str | None, relative: str, dataset: str) -> Path:
    """The path of `relative` under the data dir, or a DataError saying where it looked."""
    root, origin = resolve_data_dir(data_dir)
    if root is None:
        raise DataError(
            f"dataset {dataset!r} reads {relative} from a data dir, but none is set: pass "
            f"--data-dir DIR or set ${DATA_DIR_ENV}"
        )
    path = root / relative
    if not path.is_file():
        raise DataError(
            f"dataset {dataset!r}: file not found: {path} (data dir {root} from {origin}; "
            f"expected {relative} inside it)"
        )
    return path
