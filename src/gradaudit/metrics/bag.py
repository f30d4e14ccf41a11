"""How well a bag (multiset) of recovered items matches the truth: tokens, diagnosis codes."""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from gradaudit.types import TaskInfo


def bag_metrics(recovered: Tensor, truth: Tensor, *, item: str) -> dict[str, float]:
    """Recall and precision of a recovered bag of item ids against the true one.

    * ``<item>_recall``: the share of the distinct true items that were recovered;
    * ``<item>_precision``: the share of the distinct recovered items that are true;
    * ``<item>_count_accuracy``: ``|recovered ∩ truth| / |truth|`` as multisets (each item
      counted as often as it occurs in both), so it rewards recovered counts; equal to the
      recall when every item occurs once.

    Args:
        recovered: item ids, any shape (flattened); repeats are counts.
        truth: the true item ids, non-empty.
        item: the metric names' prefix (``token``, ``code``).

    Example:
        >>> bag_metrics(torch.tensor([3, 5, 7]), torch.tensor([3, 3, 5, 9]), item="token")
        {'token_recall': 0.6666666666666666, 'token_precision': 0.6666666666666666, \
'token_count_accuracy': 0.5}
    """
    true_counts = Counter(int(v) for v in truth.flatten().tolist())
    if not true_counts:
        raise ValueError("the true bag is empty")
    got = Counter(int(v) for v in recovered.flatten().tolist())
    hits = set(true_counts) & set(got)
    return {
        f"{item}_recall": len(hits) / len(true_counts),
        f"{item}_precision": len(hits) / len(got) if got else 0.0,
        f"{item}_count_accuracy": sum((true_counts & got).values()) / true_counts.total(),
    }


def true_bag(x: Tensor, task: TaskInfo) -> tuple[Tensor, str]:
    """The bag of items behind inputs `x`, and the items' name for `bag_metrics`.

    Text (and the token part of multimodal rows): every non-padding token id. Tabular rows:
    each categorical column's code shifted by `TabularSchema.categorical_offsets`.

    Raises:
        ValueError: the task has neither token sequences nor categorical columns.

    Example:
        >>> from gradaudit.types import TabularSchema
        >>> schema = TabularSchema(("age",), ("sex", "cp"), (2, 4))
        >>> task = TaskInfo("t", "tabular", (3,), 2, None, ("n", "y"), tabular=schema)
        >>> true_bag(torch.tensor([[0.3, 1.0, 2.0], [1.2, 0.0, 2.0]]), task)
        (tensor([1, 4, 0, 4]), 'code')
    """
    if task.text is not None:
        tokens = x[:, x.shape[1] - task.text.max_length :].long().flatten()
        return tokens[tokens != task.text.pad_id], "token"
    schema = task.tabular
    if schema is None or not schema.categorical:
        raise ValueError(f"{task.dataset} has no tokens or categorical codes to bag")
    codes = x[:, len(schema.numeric) : schema.num_features].long()
    offsets = torch.tensor(schema.categorical_offsets(), dtype=torch.long)
    return (codes + offsets).flatten(), "code"
