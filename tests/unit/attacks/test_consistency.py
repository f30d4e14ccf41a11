"""Domain rules on reconstructed rows: which apply, what breaks them, repair and drop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradaudit.attacks.inversion.consistency import (
    GENERIC_RULES,
    Determines,
    Implication,
    RangeRule,
    enforce,
    plausible_bounds,
    rules_for,
    violations,
)
from gradaudit.data import load_dataset
from gradaudit.types import TabularSchema, TaskInfo

RELATIONSHIP = ("Husband", "Not-in-family", "Own-child", "Wife", "?")
SEX = ("Female", "Male", "?")
MARITAL = ("Divorced", "Married-civ-spouse", "Never-married", "?")
EDUCATION = ("Bachelors", "HS-grad", "Masters", "?")
SCHEMA = TabularSchema(
    numeric=("age", "education-num"),
    categorical=("relationship", "sex", "marital-status", "education"),
    cardinalities=(5, 3, 4, 4),
    categories=(RELATIONSHIP, SEX, MARITAL, EDUCATION),
    numeric_mean=(40.0, 10.0),
    numeric_std=(10.0, 2.0),
)
ADULT = TaskInfo("adult", "tabular", (6,), 2, None, ("<=50K", ">50K"), tabular=SCHEMA)


def row(age: float, years: float, rel: str, sex: str, marital: str, edu: str) -> list[float]:
    """One Adult-like row in model units from raw values and category names."""
    return [
        (age - 40.0) / 10.0,
        (years - 10.0) / 2.0,
        float(RELATIONSHIP.index(rel)),
        float(SEX.index(sex)),
        float(MARITAL.index(marital)),
        float(EDUCATION.index(edu)),
    ]


def test_adult_gets_its_rules_other_datasets_only_generic_ones() -> None:
    rules = rules_for(ADULT)
    kinds = {type(r) for r in rules}
    assert kinds == {RangeRule, Implication, Determines}
    assert {r.column for r in rules if isinstance(r, RangeRule)} == {"age", "education-num"}
    # Adult's rules need Adult's names: another dataset with the same columns gets none of them
    other = TaskInfo("census", "tabular", (6,), 2, None, ("a", "b"), tabular=SCHEMA)
    assert rules_for(other) == GENERIC_RULES
    no_age = TabularSchema(("bmi",), (), (), numeric_mean=(25.0,), numeric_std=(4.0,))
    assert rules_for(TaskInfo("x", "tabular", (1,), 2, None, ("a", "b"), tabular=no_age)) == ()
    unscaled = TabularSchema(("age",), (), ())  # no raw units: range rules cannot be checked
    assert rules_for(TaskInfo("x", "tabular", (1,), 2, None, ("a", "b"), tabular=unscaled)) == ()


def test_violations_flag_each_broken_rule() -> None:
    rules = rules_for(ADULT)
    rows = torch.tensor(
        [
            row(35, 13, "Husband", "Male", "Married-civ-spouse", "Bachelors"),
            row(35, 13, "Husband", "Female", "Married-civ-spouse", "Bachelors"),
            row(12, 9, "Own-child", "Female", "Never-married", "HS-grad"),
            row(35, 9, "Wife", "Female", "Never-married", "Masters"),
        ]
    )
    broken = violations(rows, SCHEMA, rules)
    names = [r.describe() for r in rules]
    flagged = [[names[i] for i in torch.nonzero(b).flatten().tolist()] for b in broken]
    assert flagged[0] == []
    assert flagged[1] == ["relationship=Husband implies sex=Male (a husband is male)"]
    assert flagged[2] == ["age in [17, 90] (the census sample: over 16, top-coded at 90)"]
    assert set(flagged[3]) == {
        "relationship=Wife implies marital-status=Married-civ-spouse or Married-AF-spouse "
        "(a wife is married)",
        "education determines education-num (the census codebook)",
    }


def test_repair_picks_the_most_probable_consistent_categories() -> None:
    rows = torch.tensor(
        [
            row(35, 13, "Husband", "Female", "Married-civ-spouse", "Bachelors"),
            row(35, 13, "Husband", "Female", "Married-civ-spouse", "Bachelors"),
        ]
    )
    probs = [
        torch.tensor([[0.9, 0.1, 0, 0, 0], [0.55, 0.05, 0, 0.4, 0]]),  # relationship
        torch.tensor([[0.6, 0.4, 0.0], [0.9, 0.1, 0.0]]),  # sex
        torch.tensor([[0, 1.0, 0, 0], [0, 1.0, 0, 0]]),
        torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]),
    ]
    out = enforce(rows, SCHEMA, rules_for(ADULT), mode="repair", probs=probs)
    # row 0: Husband is sure, so sex becomes Male (0.9 * 0.4 beats Wife's 0 * 0.6)
    assert out.rows[0, 2:4].tolist() == [RELATIONSHIP.index("Husband"), SEX.index("Male")]
    # row 1: Female is sure enough that Wife (0.4 * 0.9) beats Husband-and-Male (0.55 * 0.1)
    assert out.rows[1, 2:4].tolist() == [RELATIONSHIP.index("Wife"), SEX.index("Female")]
    assert out.kept.tolist() == [True, True]
    assert out.repaired.tolist() == [True, True]
    assert out.report["repaired"] == 2 and out.report["dropped"] == 0


def test_repair_clamps_ranges_and_sets_determined_values() -> None:
    rows = torch.tensor([row(130, 9, "Own-child", "Male", "Never-married", "Masters")])
    out = enforce(rows, SCHEMA, rules_for(ADULT), mode="repair")
    age = float(out.rows[0, 0]) * 10 + 40
    years = float(out.rows[0, 1]) * 2 + 10
    assert age == pytest.approx(90.0) and years == pytest.approx(14.0)  # Masters: 14 years
    assert out.kept.tolist() == [True]
    assert not violations(out.rows, SCHEMA, rules_for(ADULT)).any()


def test_what_cannot_be_repaired_is_dropped() -> None:
    rows = torch.tensor(
        [
            row(35, 13, "Husband", "Female", "Married-civ-spouse", "Bachelors"),
            row(35, 9, "Not-in-family", "Male", "Divorced", "?"),  # "?" fixes no years
        ]
    )
    sure = [
        torch.nn.functional.one_hot(rows[:, 2 + j].long(), card).double()
        for j, card in enumerate(SCHEMA.cardinalities)
    ]  # each row's own codes are certain: Husband and Female cannot both stay
    out = enforce(rows, SCHEMA, rules_for(ADULT), mode="repair", probs=sure)
    assert out.kept.tolist() == [False, False]
    assert out.report["dropped"] == 2


def test_drop_keeps_only_rows_that_break_nothing_and_changes_nothing() -> None:
    rows = torch.tensor(
        [
            row(35, 13, "Husband", "Male", "Married-civ-spouse", "Bachelors"),
            row(35, 13, "Husband", "Female", "Married-civ-spouse", "Bachelors"),
            row(95, 9, "Own-child", "Female", "Never-married", "HS-grad"),
        ]
    )
    out = enforce(rows, SCHEMA, rules_for(ADULT), mode="drop")
    assert out.kept.tolist() == [True, False, False]
    assert torch.equal(out.rows, rows) and not out.repaired.any()
    off = enforce(rows, SCHEMA, rules_for(ADULT), mode="off")
    assert off.kept.all() and torch.equal(off.rows, rows)
    assert (
        off.report["broken"]["age in [17, 90] (the census sample: over 16, top-coded at 90)"] == 1
    )


def test_plausible_bounds_in_model_units() -> None:
    low, high = plausible_bounds(ADULT, default=4.0)
    assert low.tolist() == pytest.approx([(17 - 40) / 10, (1 - 10) / 2])
    assert high.tolist() == pytest.approx([(90 - 40) / 10, (16 - 10) / 2])
    other = TaskInfo("census", "tabular", (6,), 2, None, ("a", "b"), tabular=SCHEMA)
    low, high = plausible_bounds(other, default=4.0)  # generic: age only
    assert low.tolist() == pytest.approx([-4.0, -4.0]) and high[1] == 4.0


@pytest.mark.data
@pytest.mark.parametrize(("dataset", "at_most"), [("adult", 5), ("heart_disease", 2)])
def test_real_records_rarely_break_the_rules(
    shared_data_dir: Path, dataset: str, at_most: int
) -> None:
    data = load_dataset(dataset, shared_data_dir)
    rows = torch.cat([data.x_train, data.x_test])
    rules = rules_for(data.info)
    assert len(rules) >= 6
    broken = violations(rows, data.info.tabular, rules).any(dim=1)
    assert int(broken.sum()) <= at_most
