"""TabLeak's row metrics against hand-computed values: matching, tolerance, baseline, decoding."""

from __future__ import annotations

import pytest
import torch

from gradaudit.metrics.tabular import (
    TABLEAK_TOLERANCE,
    column_accuracy,
    decode_rows,
    match_rows,
    random_baseline,
    score_rows,
    wrong_features,
)
from gradaudit.types import TabularSchema

SCHEMA = TabularSchema(
    numeric=("age", "chol"),
    categorical=("sex", "cp"),
    cardinalities=(2, 3),
    categories=(("female", "male"), ("typical", "atypical", "none")),
    numeric_mean=(50.0, 200.0),
    numeric_std=(10.0, 40.0),
)
TRUE = torch.tensor(
    [
        [0.0, 0.0, 0.0, 0.0],
        [1.0, -1.0, 1.0, 2.0],
        [-1.0, 2.0, 1.0, 1.0],
    ]
)


def test_exact_rows_in_any_order_score_one() -> None:
    order = torch.tensor([2, 0, 1])
    metrics, perm = score_rows(TRUE[order], TRUE, SCHEMA)
    assert metrics == {
        "feature_accuracy": 1.0,
        "rows_exact": 1.0,
        "numeric_accuracy": 1.0,
        "categorical_accuracy": 1.0,
    }
    assert torch.equal(TRUE[order][perm], TRUE)


def test_hand_computed_accuracies_after_matching() -> None:
    rec = torch.tensor(
        [
            [-1.2, 2.0, 1.0, 0.0],  # true row 2 with cp wrong: 3 of 4
            [0.3, 0.5, 0.0, 0.0],  # true row 0 with chol off by 0.5: 3 of 4
            [1.0, -1.0, 0.0, 1.0],  # true row 1 with sex and cp wrong: 2 of 4
        ]
    )
    metrics, perm = score_rows(rec, TRUE, SCHEMA)
    assert perm.tolist() == [1, 2, 0]
    assert metrics["feature_accuracy"] == pytest.approx(8 / 12)
    assert metrics["numeric_accuracy"] == pytest.approx(5 / 6)
    assert metrics["categorical_accuracy"] == pytest.approx(3 / 6)
    assert metrics["rows_exact"] == 0.0
    assert column_accuracy(rec[perm], TRUE, SCHEMA, tolerance=TABLEAK_TOLERANCE) == pytest.approx(
        {"age": 1.0, "chol": 2 / 3, "sex": 2 / 3, "cp": 1 / 3}
    )


def test_numeric_tolerance_is_0_319_standard_deviations() -> None:
    true = torch.zeros(1, 4)
    gaps = [0.0, 0.3, -0.318, 0.32, -0.33, 1.0]
    rec = torch.zeros(len(gaps), 4)
    rec[:, 0] = torch.tensor(gaps)
    wrong = wrong_features(rec, true, SCHEMA, tolerance=TABLEAK_TOLERANCE)[:, 0]
    assert wrong.tolist() == [False, False, False, True, True, True]


def test_matching_breaks_ties_by_numeric_distance() -> None:
    true = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    rec = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # age wrong either way
    assert match_rows(rec, true, SCHEMA).tolist() == [1, 0]


def test_kept_rows_give_the_precision_of_what_survives() -> None:
    rec = TRUE.clone()
    rec[1, 2] = 0.0  # one wrong feature in row 1
    kept = torch.tensor([True, False, True])
    metrics, _ = score_rows(rec[[1, 0, 2]], TRUE, SCHEMA, kept=kept[[1, 0, 2]])
    assert metrics["kept_rows"] == 2.0
    assert metrics["kept_feature_accuracy"] == 1.0
    assert metrics["feature_accuracy"] == pytest.approx(11 / 12)
    none_kept, _ = score_rows(rec, TRUE, SCHEMA, kept=torch.zeros(3, dtype=torch.bool))
    assert none_kept["kept_rows"] == 0.0
    assert "kept_feature_accuracy" not in none_kept


def test_random_baseline_guesses_from_the_marginals() -> None:
    # every reference row is the same: every guessed feature is that value
    reference = torch.tensor([[0.0, 0.0, 1.0, 2.0]]).repeat(5, 1)
    true = torch.tensor([[0.1, 5.0, 1.0, 0.0], [3.0, 0.2, 0.0, 2.0]])
    assert random_baseline(true, reference, SCHEMA) == pytest.approx(0.5)
    metrics, _ = score_rows(true, true, SCHEMA, reference=reference)
    assert metrics["feature_accuracy_random"] == pytest.approx(0.5)


def test_random_baseline_is_deterministic_and_rewards_matching_marginals() -> None:
    g = torch.Generator().manual_seed(0)
    numeric = torch.randn(400, 2, generator=g)
    sex = torch.randint(2, (400, 1), generator=g).float()
    cp = torch.randint(3, (400, 1), generator=g).float()
    reference = torch.cat([numeric, sex, cp], dim=1)
    true = reference[:8]
    value = random_baseline(true, reference, SCHEMA)
    assert value == random_baseline(true, reference, SCHEMA)
    # far rows and codes no reference row has: the guess can only be wrong
    elsewhere = torch.tensor([[9.0, 9.0, 0.0, 0.0]]).repeat(8, 1)
    only_male = reference.clone()
    only_male[:, 2] = 1.0
    only_male[:, 3] = 2.0
    assert random_baseline(elsewhere, only_male, SCHEMA) == 0.0
    assert 0.25 < value < 1.0


def test_decode_rows_gives_raw_units_and_category_names() -> None:
    assert decode_rows(TRUE[1:2], SCHEMA) == [
        {"age": 60.0, "chol": 160.0, "sex": "male", "cp": "none"}
    ]
    bare = TabularSchema(("x",), ("c",), (3,))
    assert decode_rows(torch.tensor([[0.25, 2.0], [1.0, 7.0]]), bare) == [
        {"x": 0.25, "c": 2},
        {"x": 1.0, "c": 2},  # codes out of range are clamped to the last code
    ]


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        score_rows(TRUE[:, :3], TRUE, SCHEMA)
    with pytest.raises(ValueError, match="differ"):
        score_rows(TRUE[:2], TRUE, SCHEMA)
    with pytest.raises(ValueError, match="kept"):
        score_rows(TRUE, TRUE, SCHEMA, kept=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="no rows"):
        decode_rows(torch.zeros(0, 4), SCHEMA)
