"""Domain rules a reconstructed record must satisfy, and how an attacker enforces them.

A real adversary cannot compare its reconstructions with the truth, but it can reject or fix
rows no real record could have: an age of 150, a resting blood pressure of 20 mm Hg, a husband
recorded as female. The rules here are public domain knowledge, checked in raw units (the
loader's standardisation, `TabularSchema.raw_scale`), keyed by the dataset's registry name and
the column and category names of its public `TaskInfo`; a rule whose columns or categories are
absent is not used. A dataset without its own rules gets only the generic range of a column
named ``age``.

* Adult (UCI census income; Becker & Kohavi 1996, ``adult.names``): the census sample's ranges
  (age 17 to 90, hours per week 1 to 99, capital gain 0 to 99999, education-num 1 to 16),
  relationship Husband implies sex Male and Wife implies Female, both imply a married status,
  and education determines education-num (the codebook's years of education, Preschool = 1 to
  Doctorate = 16).
* UCI Heart Disease (Detrano et al. 1989; ``heart-disease.names``): plausible clinical ranges of
  adult patients' age, resting blood pressure (mm Hg), serum cholesterol (mg/dl), maximum heart
  rate, ST depression and the number of major vessels (0 to 3).

`enforce` repairs what can be repaired (clamp a value into its range; for broken implications,
choose the most probable consistent categories under the attack's relaxed probabilities; set a
determined value from its category) and drops (``kept = False``) what cannot.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from gradaudit.types import TabularSchema, TaskInfo

ConsistencyMode = Literal["off", "repair", "drop"]


@dataclass(frozen=True)
class RangeRule:
    """A numeric column's plausible range, in raw units (inclusive)."""

    column: str
    low: float
    high: float
    why: str

    def describe(self) -> str:
        """One line for the report."""
        return f"{self.column} in [{self.low:g}, {self.high:g}] ({self.why})"


@dataclass(frozen=True)
class Implication:
    """If categorical `if_column` is `if_value`, `then_column` must be one of `then_values`."""

    if_column: str
    if_value: str
    then_column: str
    then_values: tuple[str, ...]
    why: str

    def describe(self) -> str:
        """One line for the report."""
        allowed = " or ".join(self.then_values)
        return f"{self.if_column}={self.if_value} implies {self.then_column}={allowed} ({self.why})"


@dataclass(frozen=True)
class Determines:
    """Categorical `category_column` fixes numeric `numeric_column` (raw units, within 0.5)."""

    category_column: str
    numeric_column: str
    values: tuple[tuple[str, float], ...]
    why: str

    def describe(self) -> str:
        """One line for the report."""
        return f"{self.category_column} determines {self.numeric_column} ({self.why})"


Rule = RangeRule | Implication | Determines

_ADULT_EDUCATION_YEARS = (
    ("Preschool", 1.0),
    ("1st-4th", 2.0),
    ("5th-6th", 3.0),
    ("7th-8th", 4.0),
    ("9th", 5.0),
    ("10th", 6.0),
    ("11th", 7.0),
    ("12th", 8.0),
    ("HS-grad", 9.0),
    ("Some-college", 10.0),
    ("Assoc-voc", 11.0),
    ("Assoc-acdm", 12.0),
    ("Bachelors", 13.0),
    ("Masters", 14.0),
    ("Prof-school", 15.0),
    ("Doctorate", 16.0),
)
_MARRIED = ("Married-civ-spouse", "Married-AF-spouse")

DOMAIN_RULES: dict[str, tuple[Rule, ...]] = {
    "adult": (
        RangeRule("age", 17, 90, "the census sample: over 16, top-coded at 90"),
        RangeRule("hours-per-week", 1, 99, "census hours worked, top-coded at 99"),
        RangeRule("capital-gain", 0, 99999, "census capital gain, top-coded at 99999"),
        RangeRule("capital-loss", 0, 5000, "census capital loss, non-negative"),
        RangeRule("education-num", 1, 16, "years-of-education code, Preschool 1 to Doctorate 16"),
        RangeRule("fnlwgt", 10000, 1500000, "census final weight, positive"),
        Implication("relationship", "Husband", "sex", ("Male",), "a husband is male"),
        Implication("relationship", "Wife", "sex", ("Female",), "a wife is female"),
        Implication("relationship", "Husband", "marital-status", _MARRIED, "a husband is married"),
        Implication("relationship", "Wife", "marital-status", _MARRIED, "a wife is married"),
        Determines("education", "education-num", _ADULT_EDUCATION_YEARS, "the census codebook"),
    ),
    "heart_disease": (
        RangeRule("age", 18, 100, "adult patients"),
        RangeRule("trestbps", 50, 250, "resting systolic blood pressure, mm Hg"),
        RangeRule("chol", 80, 700, "serum cholesterol, mg/dl"),
        RangeRule("thalach", 50, 230, "maximum heart rate achieved, beats per minute"),
        RangeRule("oldpeak", -3, 7, "exercise-induced ST depression, mm"),
        RangeRule("ca", 0, 3, "major vessels coloured by fluoroscopy, 0 to 3"),
    ),
}
"""Rules of the datasets this package knows, by registry name."""

GENERIC_RULES: tuple[Rule, ...] = (RangeRule("age", 0, 120, "a human age in years"),)
"""Rules for datasets without their own: only what holds of any column with that name."""


def _category(schema: TabularSchema, column: str, value: str) -> int | None:
    if column not in schema.categorical:
        return None
    j = schema.categorical.index(column)
    names = schema.categories[j] if len(schema.categories) > j else ()
    return names.index(value) if value in names else None


def _usable(rule: Rule, schema: TabularSchema) -> bool:
    """Whether the schema has the rule's columns, categories (an implication's condition and at
    least one of its allowed values) and, for numeric columns, raw units."""
    has_scale = len(schema.numeric_mean) == len(schema.numeric)
    if isinstance(rule, RangeRule):
        return rule.column in schema.numeric and has_scale
    if isinstance(rule, Implication):
        return _category(schema, rule.if_column, rule.if_value) is not None and any(
            _category(schema, rule.then_column, v) is not None for v in rule.then_values
        )
    return (
        has_scale
        and rule.numeric_column in schema.numeric
        and rule.category_column in schema.categorical
    )


def rules_for(task: TaskInfo) -> tuple[Rule, ...]:
    """The rules that apply to `task`: its dataset's own, else the generic ones, keeping those
    whose columns and categories the schema has (and, for numeric rules, whose raw units the
    loader recorded)."""
    schema = task.tabular
    if schema is None:
        return ()
    rules = DOMAIN_RULES.get(task.dataset, GENERIC_RULES)
    return tuple(rule for rule in rules if _usable(rule, schema))


def plausible_bounds(task: TaskInfo, *, default: float) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds of every numeric column in model units: the range rules' where
    `rules_for` has one, else ``-default`` and ``default`` (standard deviations)."""
    schema = task.tabular
    if schema is None:
        raise ValueError(f"{task.dataset} has no tabular schema")
    low = torch.full((len(schema.numeric),), -default)
    high = torch.full((len(schema.numeric),), default)
    for rule in rules_for(task):
        if isinstance(rule, RangeRule):
            i = schema.numeric.index(rule.column)
            low[i], high[i] = _model_range(schema, rule)
    return low, high


def _model_range(schema: TabularSchema, rule: RangeRule) -> tuple[float, float]:
    """The rule's range in model units (standard deviations from the column's mean)."""
    mean, std = schema.raw_scale(rule.column)
    return (rule.low - mean) / std, (rule.high - mean) / std


def _codes(rows: Tensor, schema: TabularSchema) -> Tensor:
    return rows[:, len(schema.numeric) :].round().long()


def violations(rows: Tensor, schema: TabularSchema, rules: Sequence[Rule]) -> Tensor:
    """Which rows break which rules: (N, len(rules)) bool, for rows in model units.

    Example:
        >>> s = TabularSchema(("age",), (), (), numeric_mean=(50.0,), numeric_std=(10.0,))
        >>> violations(torch.tensor([[0.0], [8.0]]), s, [RangeRule("age", 0, 120, "")]).tolist()
        [[False], [True]]
    """
    codes = _codes(rows, schema)
    broken = torch.zeros((rows.shape[0], len(rules)), dtype=torch.bool)
    for r, rule in enumerate(rules):
        if isinstance(rule, RangeRule):
            low, high = _model_range(schema, rule)
            value = rows[:, schema.numeric.index(rule.column)].double()
            broken[:, r] = (value < low - 1e-5) | (value > high + 1e-5)
        elif isinstance(rule, Implication):
            given = codes[:, schema.categorical.index(rule.if_column)]
            then = codes[:, schema.categorical.index(rule.then_column)]
            allowed = [_category(schema, rule.then_column, v) for v in rule.then_values]
            allowed = [code for code in allowed if code is not None]
            fires = given == _category(schema, rule.if_column, rule.if_value)
            broken[:, r] = fires & ~torch.isin(then, torch.tensor(allowed))
        else:
            broken[:, r] = _determined_gap(rows, codes, schema, rule) > 0.5
    return broken


def _determined_values(schema: TabularSchema, rule: Determines) -> Tensor:
    """The raw value each code of the rule's category column fixes (NaN where none)."""
    j = schema.categorical.index(rule.category_column)
    table = torch.full((schema.cardinalities[j],), math.nan, dtype=torch.float64)
    for name, value in rule.values:
        code = _category(schema, rule.category_column, name)
        if code is not None:
            table[code] = value
    return table


def _determined_gap(rows: Tensor, codes: Tensor, schema: TabularSchema, rule: Determines) -> Tensor:
    """|raw numeric - value fixed by the category| per row (inf where the category fixes none)."""
    mean, std = schema.raw_scale(rule.numeric_column)
    raw = rows[:, schema.numeric.index(rule.numeric_column)].double() * std + mean
    column = schema.categorical.index(rule.category_column)
    fixed = _determined_values(schema, rule)[codes[:, column]]
    return torch.where(fixed.isnan(), torch.inf, (raw - fixed).abs())


@dataclass(frozen=True)
class Enforced:
    """Rows after `enforce`.

    Attributes:
        rows: the rows (repaired in ``repair`` mode).
        kept: whether each row satisfies every rule after enforcement.
        repaired: whether each row was changed.
        report: counts and rule descriptions for the report.
    """

    rows: Tensor
    kept: Tensor
    repaired: Tensor
    report: dict[str, object] = field(default_factory=dict)


def _implication_groups(rules: Sequence[Rule], schema: TabularSchema) -> list[list[int]]:
    """Categorical column indices linked by implications, one list per connected group."""
    groups: list[set[int]] = []
    for rule in rules:
        if not isinstance(rule, Implication):
            continue
        pair = {
            schema.categorical.index(rule.if_column),
            schema.categorical.index(rule.then_column),
        }
        joined = [g for g in groups if g & pair]
        merged = pair.union(*joined)
        groups = [g for g in groups if not g & pair] + [merged]
    return [sorted(g) for g in groups]


def _consistent_choice(
    columns: list[int],
    probs: Sequence[Tensor],
    schema: TabularSchema,
    implications: Sequence[Implication],
    row: int,
) -> tuple[int, ...] | None:
    """The most probable codes of `columns` for `row` that break none of `implications`, or
    None when every consistent combination has probability 0."""
    n = len(schema.numeric)
    choices = [torch.nonzero(probs[j][row] > 0).flatten().tolist() for j in columns]
    combos = list(itertools.product(*choices))
    if not combos:
        return None
    trial = torch.zeros((len(combos), schema.num_features))
    trial[:, [n + j for j in columns]] = torch.tensor(combos, dtype=torch.float32)
    consistent = ~violations(trial, schema, implications).any(dim=1)
    if not bool(consistent.any()):
        return None
    log_p = torch.stack(
        [probs[j][row].double().log()[trial[:, n + j].long()] for j in columns]
    ).sum(dim=0)
    log_p[~consistent] = -math.inf
    return combos[int(log_p.argmax())]


def enforce(
    rows: Tensor,
    schema: TabularSchema,
    rules: Sequence[Rule],
    *,
    mode: ConsistencyMode,
    probs: Sequence[Tensor] | None = None,
) -> Enforced:
    """Apply `rules` to reconstructed `rows` (model units).

    ``drop`` keeps the rows that break no rule, unchanged. ``repair`` first fixes each row:
    numeric values are clamped into their ranges; a category that fixes a numeric value sets it;
    the columns linked by broken implications are set to the most probable consistent codes
    under `probs` (per categorical column, (N, cardinality) probabilities; the rows' own codes
    count as certain when None); a row with no consistent option of non-zero probability stays
    broken and is dropped. ``off`` keeps everything as it is.

    Example:
        >>> s = TabularSchema(("age",), (), (), numeric_mean=(50.0,), numeric_std=(10.0,))
        >>> out = enforce(torch.tensor([[8.0]]), s, [RangeRule("age", 0, 120, "")], mode="repair")
        >>> out.rows.tolist(), out.kept.tolist()
        ([[7.0]], [True])
    """
    count = rows.shape[0]
    rows = rows.detach().clone()
    descriptions = [rule.describe() for rule in rules]
    before = violations(rows, schema, rules) if rules else torch.zeros((count, 0), dtype=torch.bool)
    report: dict[str, object] = {
        "mode": mode,
        "rules": descriptions,
        "broken": {d: int(before[:, r].sum()) for r, d in enumerate(descriptions)},
    }
    if mode == "off" or not rules:
        all_kept = torch.ones(count, dtype=torch.bool)
        return Enforced(rows, all_kept, torch.zeros(count, dtype=torch.bool), report)
    if mode == "drop":
        kept = ~before.any(dim=1)
        report["dropped"] = int((~kept).sum())
        return Enforced(rows, kept, torch.zeros(count, dtype=torch.bool), report)
    n = len(schema.numeric)
    if probs is None:
        codes = _codes(rows, schema)
        probs = [
            (codes[:, j : j + 1] == torch.arange(card)).double()
            for j, card in enumerate(schema.cardinalities)
        ]
    original = rows.clone()
    for group in _implication_groups(rules, schema):
        inside = [
            r
            for r, rule in enumerate(rules)
            if isinstance(rule, Implication) and schema.categorical.index(rule.if_column) in group
        ]
        implications = [rules[r] for r in inside]
        for row in torch.nonzero(before[:, inside].any(dim=1)).flatten().tolist():
            choice = _consistent_choice(group, probs, schema, implications, row)  # type: ignore[arg-type]
            if choice is not None:
                rows[row, [n + j for j in group]] = torch.tensor(choice, dtype=rows.dtype)
    codes = _codes(rows, schema)
    for rule in rules:
        if isinstance(rule, Determines):
            i = schema.numeric.index(rule.numeric_column)
            mean, std = schema.raw_scale(rule.numeric_column)
            fixed = _determined_values(schema, rule)[
                codes[:, schema.categorical.index(rule.category_column)]
            ]
            wrong = (_determined_gap(rows, codes, schema, rule) > 0.5) & ~fixed.isnan()
            rows[wrong, i] = ((fixed[wrong] - mean) / std).to(rows.dtype)
    for rule in rules:
        if isinstance(rule, RangeRule):
            i = schema.numeric.index(rule.column)
            rows[:, i] = rows[:, i].clamp(*_model_range(schema, rule))
    kept = ~violations(rows, schema, rules).any(dim=1)
    repaired = (rows != original).any(dim=1)
    report["repaired"] = int(repaired.sum())
    report["dropped"] = int((~kept).sum())
    return Enforced(rows, kept, repaired, report)
