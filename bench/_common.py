"""Shared helpers of the benchmark scripts: data location, CIFAR-10 picks, machine facts."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """$GRADAUDIT_DATA_DIR, else the workplace's ../shared/datasets."""
    env = os.environ.get("GRADAUDIT_DATA_DIR")
    return Path(env) if env else (REPO / ".." / "shared" / "datasets").resolve()


def cifar10_test_picks(per_class_index: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The `per_class_index`-th test image of every class, in pixel space (10, 3, 32, 32)."""
    path = data_dir() / "cifar10" / "cifar10_jpeg_test.npz"
    with np.load(path, allow_pickle=False) as npz:
        x, y, idx = npz["x_test"], npz["y_test"], npz["idx_in_class"]
        names = [str(n) for n in npz["label_names"]]
    rows = [int(np.flatnonzero((y == c) & (idx == per_class_index))[0]) for c in range(10)]
    images = x[rows].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return images, y[rows].astype(np.int64), names


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
