"""Label recovery quality."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from torch import Tensor


def _as_ints(labels: Tensor | Iterable[int]) -> list[int]:
    if isinstance(labels, Tensor):
        return [int(v) for v in labels.detach().flatten().tolist()]
    return [int(v) for v in labels]


def label_accuracy(
    pred_labels: Tensor | Iterable[int], true_labels: Tensor | Iterable[int]
) -> float:
    """Fraction of the true labels recovered, comparing the two as multisets (order is ignored).

    ``|pred ∩ true| / len(true)`` where the intersection keeps each label as many times as it
    occurs in both. Extra predicted labels are not penalised beyond the true ones they fail to
    cover (with equal sizes, every wrong label displaces a right one).

    Args:
        pred_labels: recovered labels, any shape (flattened).
        true_labels: the batch's true labels, non-empty.

    Returns:
        A float in [0, 1].

    Raises:
        ValueError: `true_labels` is empty.

    Example:
        >>> label_accuracy([1, 1, 2], [1, 2, 2])
        0.6666666666666666
        >>> import torch
        >>> label_accuracy(torch.tensor([3, 0]), torch.tensor([0, 3]))
        1.0
    """
    pred, true = _as_ints(pred_labels), _as_ints(true_labels)
    if not true:
        raise ValueError("label_accuracy needs at least one true label")
    overlap = Counter(pred) & Counter(true)
    return sum(overlap.values()) / len(true)
