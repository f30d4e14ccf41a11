"""Which categorical codes (diagnosis codes, census categories) a client's batch contained.

The first layer of a tabular model reads each categorical column through a row of an embedding
table or a one-hot input column. A code that no example in the batch has receives exactly zero
gradient there (its embedding row is never looked up; its one-hot input is 0 in every row, so
the first Linear's weight column, ``sum_i delta_i x_ik``, is 0), and a code that some example has
receives a non-zero one (barring an exact cancellation). The update therefore lists, per column,
the codes present: the "128-dimensional embeddings of ICD-10 codes" of a hospital's model give
away which diagnoses its batch held. Melis et al., "Exploiting Unintended Feature Leakage in
Collaborative Learning", S&P 2019 (the bag of words from embedding gradients); for one-hot
inputs the same holds for the first layer's weight columns (Vero et al., "TabLeak", ICML 2023,
treat the one-hot network).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.attacks.base import (
    ProgressFn,
    Reconstructs,
    checked_update,
    gradient_estimate,
    not_applicable,
)
from gradaudit.attacks.inversion.embedding import looked_up_rows
from gradaudit.attacks.labels import round_counts
from gradaudit.models.tabular import TabularMLP
from gradaudit.types import AttackResult, ClientUpdate, Observation, Reconstruction, TabularSchema


def _parameter_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def code_signal_keys(model: TabularMLP) -> list[str]:
    """The update keys whose gradient reveals the codes: one per categorical column for the
    embedding encoding, the input layer's weight (shared by every column) for one-hot."""
    names = _parameter_names(model)
    if model.encoding == "embedding":
        return [names[id(e.weight)] for e in model.embeddings]
    return [names[id(model.input_layer().weight)]]


def code_signals(model: TabularMLP, grads: Mapping[str, Tensor]) -> list[Tensor]:
    """Per categorical column, a (cardinality, d) matrix whose row c is the gradient that code c
    received: its embedding row's gradient, or its one-hot input's weight column (transposed).

    Raises:
        KeyError: `grads` lacks a tensor the encoding needs (the client withheld it).
    """
    keys = code_signal_keys(model)
    if model.encoding == "embedding":
        return [grads[key].detach() for key in keys]
    weight = grads[keys[0]].detach()
    return [weight[:, model.onehot_columns(j)].T for j in range(len(model.cardinalities))]


def present_codes(signals: list[Tensor], *, rtol: float = 0.0) -> list[Tensor]:
    """The codes of each column whose signal row is non-zero (see `looked_up_rows`), ascending.

    Example:
        >>> g = torch.zeros(3, 2); g[2] = 1.0
        >>> [c.tolist() for c in present_codes([g, torch.ones(2, 2)])]
        [[2], [0, 1]]
    """
    return [looked_up_rows(signal, rtol=rtol) for signal in signals]


def code_counts(signal: Tensor, present: Tensor, count: int) -> tuple[np.ndarray, bool]:
    """How many of the `count` examples have each present code of one column.

    Exact when the answer is forced: one present code (all `count` examples have it), or as many
    present codes as examples (one each). Otherwise an estimate: each example adds its first-layer
    backward signal to the row of its code, so the rows sum to the column's total ``s``; the share
    of code c is estimated as its projection ``<v_c, s> / |s|^2`` (the shares sum to 1), every
    present code gets at least one example, and the rest are rounded to sum to `count`.

    Returns:
        The counts (one per present code, in `present` order) and whether they are exact.

    Example:
        >>> v = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
        >>> code_counts(v, torch.tensor([0, 1]), 4)
        (array([3, 1]), False)
    """
    k = int(present.numel())
    if k == 0:
        return np.zeros(0, dtype=np.int64), True
    if k == 1:
        return np.array([count], dtype=np.int64), True
    if k >= count:
        return np.ones(k, dtype=np.int64), k == count
    rows = signal[present].to(torch.float64).flatten(1)
    total = rows.sum(dim=0)
    shares = (rows @ total) / total.pow(2).sum().clamp_min(1e-300)
    extra = round_counts(count * shares.numpy() - 1.0, count - k)
    return extra + 1, False


class CategoricalCodesParams(BaseModel):
    """Parameters of `categorical_codes`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rtol: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="a code counts as present when its gradient row's norm exceeds rtol times "
        "the column's largest (0 = exact; raise it for noisy updates)",
    )
    counts: Literal["estimate", "exact"] = Field(
        "estimate",
        description="repeats in the bag: estimate every column's counts (exact where forced), or "
        "only the forced ones (other present codes once each)",
    )


class CategoricalCodesAttack(Reconstructs):
    """Recover which codes of each categorical column the target's examples had.

    Reads the gradient of each column's embedding table (embedding encoding) or of the first
    layer's one-hot weight columns (one-hot encoding): the non-zero rows are the codes present.
    Counts are exact where forced and otherwise estimated (see `code_counts`). The result is a
    bag of ``offset(column) + code`` ids (`TabularSchema.categorical_offsets`).

    Melis et al., "Exploiting Unintended Feature Leakage in Collaborative Learning", S&P 2019.
    Threat model: an honest-but-curious server that sees the individual update.
    """

    name: ClassVar[str] = "categorical_codes"

    def __init__(self, params: CategoricalCodesParams) -> None:
        self.params = params

    def _update(self, obs: Observation) -> tuple[ClientUpdate | None, str | None]:
        """Needs the target's individual update of a model with categorical columns."""
        update, reason = checked_update(obs, attack=self.name)
        if update is None:
            return None, reason
        schema = obs.task.tabular
        if schema is None or not schema.categorical:
            return None, f"{obs.task.dataset} has no categorical columns"
        return update, None

    def run(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """List the codes present in the target's update, with counts."""
        update, reason = self._update(obs)
        if update is None:
            return not_applicable(self.name, obs, str(reason))
        if not isinstance(model, TabularMLP):
            return not_applicable(
                self.name, obs, "categorical_codes reads a tabular_mlp's first layer"
            )
        started = time.perf_counter()
        schema = obs.task.tabular
        assert schema is not None
        grads, grad_source = gradient_estimate(update, obs)
        missing = [key for key in code_signal_keys(model) if key not in grads]
        if missing:
            return not_applicable(
                self.name, obs, f"the client withheld the first layer ({', '.join(missing)})"
            )
        signals = code_signals(model, grads)
        present = present_codes(signals, rtol=self.params.rtol)
        bag, found, exact = self._bag(schema, signals, present, update.num_examples)
        if progress is not None:
            progress(1, 1)
        return AttackResult(
            self.name,
            obs.round,
            obs.target_client,
            "ok",
            reconstruction=Reconstruction(bag=bag),
            seconds=time.perf_counter() - started,
            details={
                "encoding": model.encoding,
                "gradient": grad_source,
                "examples": update.num_examples,
                "codes": found,
                "exact_counts": exact,
                "rtol": self.params.rtol,
            },
        )

    def _bag(
        self, schema: TabularSchema, signals: list[Tensor], present: list[Tensor], count: int
    ) -> tuple[Tensor, dict[str, int], list[str]]:
        """The bag of offset ids, the decoded ``column=category`` counts, and the columns whose
        counts are exact."""
        offsets = schema.categorical_offsets()
        ids: list[int] = []
        found: dict[str, int] = {}
        exact: list[str] = []
        for j, column in enumerate(schema.categorical):
            counts, is_exact = code_counts(signals[j], present[j], count)
            if not is_exact and self.params.counts == "exact":
                counts = np.ones_like(counts)
            if is_exact:
                exact.append(column)
            names = schema.categories[j] if len(schema.categories) > j else ()
            for code, times in zip(present[j].tolist(), counts.tolist(), strict=True):
                label = names[code] if len(names) > code else str(code)
                found[f"{column}={label}"] = int(times)
                ids += [offsets[j] + code] * int(times)
        return torch.tensor(ids, dtype=torch.long), found, exact
