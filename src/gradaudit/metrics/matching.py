"""Pairing a reconstructed batch with the true one: the order of a reconstruction means nothing."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def best_pairing(score: np.ndarray, *, maximize: bool = False) -> Tensor:
    """The assignment of reconstructions to true examples that minimises (or maximises) the
    total `score` (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``).

    Args:
        score: (N, N) array, ``score[i, j]`` for true example i paired with reconstruction j.
        maximize: maximise the total instead of minimising it.

    Returns:
        LongTensor ``perm`` (N,): reconstruction ``perm[i]`` is paired with true example i.

    Example:
        >>> best_pairing(np.array([[5.0, 0.0], [0.0, 5.0]])).tolist()
        [1, 0]
    """
    rows, cols = linear_sum_assignment(score, maximize=maximize)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


__all__ = ["best_pairing"]
