"""How well reconstructed tabular rows match the private ones (TabLeak's accuracy measures).

Vero, Balunović, Dimitrov & Vechev, "TabLeak: Tabular Data Leakage in Federated Learning",
ICML 2023, §6: a categorical feature is right when its category is exact; a numeric feature is
right when it lies within ``0.319 * std`` of the true value, the std being the column's over the
dataset (0.319 standard deviations bound 25 % of a Gaussian's mass around its mean). Rows carry
no order, so reconstructed rows are first matched to the true ones (Hungarian algorithm on the
number of wrong features per pair). The random baseline guesses every feature of every row
independently from the feature's empirical marginal and is matched the same way (TabLeak's
``all_empirical`` baseline).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradaudit.metrics.matching import best_pairing
from gradaudit.types import TabularSchema

TABLEAK_TOLERANCE = 0.319
"""TabLeak's numeric tolerance in standard deviations of the column. The tabular loaders
standardise every numeric column with the training split's std, so in model units it is 0.319."""

BASELINE_DRAWS = 16
"""Random guesses averaged in :func:`random_baseline` (a fixed seed keeps it deterministic)."""


def _check_rows(rows: Tensor, schema: TabularSchema, what: str) -> None:
    if rows.dim() != 2 or rows.shape[1] != schema.num_features:
        raise ValueError(
            f"{what} must be (N, {schema.num_features}) rows laid out as the schema says; got "
            f"{tuple(rows.shape)}"
        )
    if rows.shape[0] == 0:
        raise ValueError(f"{what} holds no rows")


def wrong_features(rec: Tensor, true: Tensor, schema: TabularSchema, *, tolerance: float) -> Tensor:
    """Which features of row pairs are wrong: ``(..., F)`` bool for broadcastable `rec`, `true`.

    A numeric feature is wrong when it is more than `tolerance` (model units) from the truth,
    a categorical one when its code differs.

    Example:
        >>> s = TabularSchema(("age",), ("sex",), (2,))
        >>> wrong_features(torch.tensor([[0.3, 1.0]]), torch.tensor([[0.0, 0.0]]), s,
        ...                tolerance=0.319).tolist()
        [[False, True]]
    """
    n = len(schema.numeric)
    rec, true = rec.detach().to(torch.float64), true.detach().to(torch.float64)
    numeric = (rec[..., :n] - true[..., :n]).abs() > tolerance
    categorical = rec[..., n:].round() != true[..., n:].round()
    return torch.cat([numeric, categorical], dim=-1)


def row_costs(rec: Tensor, true: Tensor, schema: TabularSchema, *, tolerance: float) -> Tensor:
    """The matching cost of every (true row i, reconstructed row k) pair, (N_true, N_rec).

    The share of wrong features, plus a tie-break from the mean numeric distance (capped at
    10 units) small enough that all of them together weigh less than one wrong feature: among
    assignments with as many wrong features, the closer one wins.
    """
    wrong = wrong_features(rec[None, :, :], true[:, None, :], schema, tolerance=tolerance)
    cost = wrong.to(torch.float64).mean(dim=-1)
    n = len(schema.numeric)
    if n:
        gap = (rec[None, :, :n].double() - true[:, None, :n].double()).abs().clamp(max=10.0)
        scale = 0.5 / (schema.num_features * max(rec.shape[0], true.shape[0]) * 10.0)
        cost = cost + scale * gap.mean(dim=-1)
    return cost


def match_rows(
    rec: Tensor, true: Tensor, schema: TabularSchema, *, tolerance: float = TABLEAK_TOLERANCE
) -> Tensor:
    """Pair each true row with one reconstructed row, minimising the wrong features in total.

    Returns:
        LongTensor ``perm`` (N,): ``rec[perm[i]]`` is matched to ``true[i]``.

    Example:
        >>> s = TabularSchema(("age",), ("sex",), (2,))
        >>> true = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
        >>> match_rows(true.flip(0), true, s).tolist()
        [1, 0]
    """
    if rec.shape != true.shape:
        raise ValueError(f"rec {tuple(rec.shape)} and true {tuple(true.shape)} differ")
    cost = row_costs(rec, true, schema, tolerance=tolerance)
    return best_pairing(cost.cpu().numpy())


def random_baseline(
    true_rows: Tensor,
    reference: Tensor,
    schema: TabularSchema,
    *,
    tolerance: float = TABLEAK_TOLERANCE,
    draws: int = BASELINE_DRAWS,
    seed: int = 0,
) -> float:
    """TabLeak's random baseline: the feature accuracy of a batch guessed without the update.

    Every feature of every guessed row is drawn independently from that feature's empirical
    marginal, here the `reference` rows (a held-out split standing in for the marginals); the
    guess is matched to `true_rows` like a reconstruction and scored; the mean over `draws`
    guesses from a generator seeded with `seed` is returned, so the value is deterministic.
    """
    _check_rows(reference, schema, "reference")
    generator = torch.Generator().manual_seed(seed)
    count, width = true_rows.shape
    columns = torch.arange(width)
    total = 0.0
    for _ in range(draws):
        picks = torch.randint(len(reference), (count, width), generator=generator)
        guess = reference[picks, columns]
        perm = match_rows(guess, true_rows, schema, tolerance=tolerance)
        wrong = wrong_features(guess[perm], true_rows, schema, tolerance=tolerance)
        total += float((~wrong).to(torch.float64).mean())
    return total / draws


def column_accuracy(
    rec_matched: Tensor, true_rows: Tensor, schema: TabularSchema, *, tolerance: float
) -> dict[str, float]:
    """Accuracy of each column over matched rows (``rec_matched[i]`` against ``true_rows[i]``).

    Example:
        >>> s = TabularSchema(("age",), ("sex",), (2,))
        >>> column_accuracy(torch.tensor([[0.1, 1.0], [2.0, 1.0]]),
        ...                 torch.tensor([[0.0, 1.0], [0.0, 0.0]]), s, tolerance=0.319)
        {'age': 0.5, 'sex': 0.5}
    """
    right = ~wrong_features(rec_matched, true_rows, schema, tolerance=tolerance)
    names = (*schema.numeric, *schema.categorical)
    return {name: float(right[:, f].to(torch.float64).mean()) for f, name in enumerate(names)}


def score_rows(
    rec_rows: Tensor,
    true_rows: Tensor,
    schema: TabularSchema,
    *,
    kept: Tensor | None = None,
    reference: Tensor | None = None,
    tolerance: float = TABLEAK_TOLERANCE,
) -> tuple[dict[str, float], Tensor]:
    """Score reconstructed rows against the true ones after matching them (order is free).

    Metrics:

    * ``feature_accuracy``: right features over all features of all rows (TabLeak's accuracy);
    * ``numeric_accuracy`` / ``categorical_accuracy``: the same over one kind of column
      (absent when the schema has no column of that kind);
    * ``rows_exact``: the share of rows with every feature right;
    * ``feature_accuracy_random``: :func:`random_baseline` with `reference` (only when given);
    * ``kept_rows``: how many rows the attacker kept (only when `kept` is given), and
      ``kept_feature_accuracy``: the feature accuracy of those rows, i.e. the precision of what
      survives the attacker's own checks (absent when it kept none).

    Args:
        rec_rows: reconstructed rows in model space, (N, F).
        true_rows: the private rows, (N, F).
        schema: the column layout.
        kept: per reconstructed row, whether the attacker kept it.
        reference: rows standing in for the feature marginals (the held-out split).
        tolerance: the numeric tolerance in model units (standard deviations).

    Returns:
        ``(metrics, perm)``: ``rec_rows[perm[i]]`` is matched to ``true_rows[i]``.

    Example:
        >>> s = TabularSchema(("age",), ("sex",), (2,))
        >>> true = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
        >>> metrics, perm = score_rows(torch.tensor([[1.2, 1.0], [0.5, 1.0]]), true, s)
        >>> metrics["feature_accuracy"], perm.tolist()
        (0.5, [1, 0])
    """
    _check_rows(rec_rows, schema, "rec_rows")
    _check_rows(true_rows, schema, "true_rows")
    perm = match_rows(rec_rows, true_rows, schema, tolerance=tolerance)
    right = ~wrong_features(rec_rows[perm], true_rows, schema, tolerance=tolerance)
    n = len(schema.numeric)
    metrics: dict[str, float] = {
        "feature_accuracy": float(right.to(torch.float64).mean()),
        "rows_exact": float(right.all(dim=1).to(torch.float64).mean()),
    }
    if n:
        metrics["numeric_accuracy"] = float(right[:, :n].to(torch.float64).mean())
    if schema.categorical:
        metrics["categorical_accuracy"] = float(right[:, n:].to(torch.float64).mean())
    if reference is not None:
        metrics["feature_accuracy_random"] = random_baseline(
            true_rows, reference, schema, tolerance=tolerance
        )
    if kept is not None:
        if kept.shape != (rec_rows.shape[0],):
            raise ValueError(f"kept must be ({rec_rows.shape[0]},); got {tuple(kept.shape)}")
        kept_matched = kept.to(torch.bool)[perm]
        metrics["kept_rows"] = float(kept_matched.sum())
        if bool(kept_matched.any()):
            metrics["kept_feature_accuracy"] = float(right[kept_matched].to(torch.float64).mean())
    return metrics, perm


def decode_rows(rows: Tensor, schema: TabularSchema) -> list[dict[str, object]]:
    """Rows in the units a person reads: raw numeric values and category names.

    Numeric values are mapped back with the loader's standardisation (`TabularSchema.raw_scale`)
    and rounded to 2 decimals; they stay in model units when the loader kept none. A code is
    named by `TabularSchema.categories` when the schema has names, else given as an int.

    Example:
        >>> s = TabularSchema(("age",), ("sex",), (2,), (("female", "male"),),
        ...                   numeric_mean=(50.0,), numeric_std=(10.0,))
        >>> decode_rows(torch.tensor([[0.5, 1.0]]), s)
        [{'age': 55.0, 'sex': 'male'}]
    """
    _check_rows(rows, schema, "rows")
    n = len(schema.numeric)
    scales = (
        [schema.raw_scale(c) for c in schema.numeric]
        if len(schema.numeric_mean) == n
        else [(0.0, 1.0)] * n
    )
    decoded: list[dict[str, object]] = []
    for row in rows.detach().to(torch.float64).tolist():
        entry: dict[str, object] = {}
        for f, column in enumerate(schema.numeric):
            mean, std = scales[f]
            entry[column] = round(row[f] * std + mean, 2)
        for j, column in enumerate(schema.categorical):
            code = min(max(round(row[n + j]), 0), schema.cardinalities[j] - 1)
            names = schema.categories[j] if len(schema.categories) > j else ()
            entry[column] = names[code] if len(names) > code else code
        decoded.append(entry)
    return decoded
