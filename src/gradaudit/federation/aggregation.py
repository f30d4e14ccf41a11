"""Server-side aggregation of client updates into the next global model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradaudit.types import ClientUpdate, TensorDict


def weighted_mean(updates: Sequence[ClientUpdate]) -> TensorDict:
    """The mean of the updates weighted by their example counts (FedAvg weighting).

    Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) are averaged and rounded.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    total = float(sum(u.num_examples for u in updates))
    out: TensorDict = {}
    for key, first in updates[0].tensors.items():
        acc = torch.zeros_like(first, dtype=torch.float64)
        for update in updates:
            acc += update.tensors[key].to(torch.float64) * (update.num_examples / total)
        out[key] = (
            acc.round().to(first.dtype) if not first.is_floating_point() else acc.to(first.dtype)
        )
    return out


def apply_aggregate(
    global_state: TensorDict,
    aggregate: TensorDict,
    *,
    kind: str,
    lr: float,
    param_names: frozenset[str],
) -> TensorDict:
    """The next global state: an SGD step for gradients (FedSGD), an added delta for FedAvg.

    Buffers always travel as deltas and are added.
    """
    new: TensorDict = {}
    for key, value in global_state.items():
        change = aggregate[key]
        if kind == "gradient" and key in param_names:
            new[key] = value - lr * change
        else:
            new[key] = value + change
    return new
